"""NVIDIA Triton (through PyTriton) serving an HF sequence-classification checkpoint; runs in the triton venv.

    LD_LIBRARY_PATH=<this python's LIBDIR> python serve_triton.py --model DIR --port 8001 \
        --grpc-port 8002 --metrics-port 8003 --max-batch-size 32 --max-wait-ms 2 --threads 2

PyTriton starts the bundled ``tritonserver`` with its Python backend; Triton's dynamic batcher forms
batches of up to ``--max-batch-size`` requests, waiting at most ``--max-wait-ms``, and hands them to
``infer`` in this process (``--instances`` copies of it). Input: BYTES ``text`` [n, 1]; outputs: BYTES
``label`` and FP32 ``score`` [n, 1]. Standalone on purpose: the project is not installed in that venv.

PyTriton puts some of Triton's APIs behind a token it makes up; statistics are left open here, as a plain
``tritonserver`` has them, because perf_analyzer reads them from every server that lists the extension.
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", default="sentiment")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the Linear layers")
    parser.add_argument("--workspace", help="PyTriton's workspace (model store, sockets); default: a temporary one")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    if args.int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    labels = np.array([model.config.id2label[i].encode() for i in range(model.config.num_labels)], dtype=object)

    @batch
    def infer(text: np.ndarray) -> dict:
        texts = [row[0].decode() for row in text]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        with torch.inference_mode():
            probs = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.softmax(-1)
        scores, indices = probs.max(-1)
        return {"label": labels[indices.numpy()].reshape(-1, 1),
                "score": scores.numpy().astype(np.float32).reshape(-1, 1)}

    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, allow_metrics=False)
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[infer] * args.instances,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="label", dtype=bytes, shape=(1,)), Tensor(name="score", dtype=np.float32, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.max_wait_ms * 1000))),
            strict=False,
        )
        print(f"triton ready on 127.0.0.1:{args.port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
