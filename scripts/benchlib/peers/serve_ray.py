"""Ray Serve serving an HF sequence-classification checkpoint; runs inside the ray peer's own venv.

    python serve_ray.py --model DIR --port 8001 --max-batch-size 32 --max-wait-ms 2 --threads 2

One replica (``--replicas``) of a deployment whose ``@serve.batch`` method runs the batch through
PyTorch; the HTTP proxy on ``--port`` routes ``POST /predict`` (``{"text"}`` or ``{"texts"}``) to it
and answers ``{"predictions": [{"label", "score"}]}``. SIGTERM shuts Serve and Ray down.
Standalone on purpose: the project is not installed in the peer's venv.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-ongoing-requests", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray schedules on")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the Linear layers")
    parser.add_argument("--access-log", action="store_true", help="log every request (Serve's default; off here)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import ray
    from ray import serve

    logging_config = {"enable_access_log": args.access_log, "log_level": "INFO" if args.access_log else "WARNING"}

    @serve.deployment(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
                      ray_actor_options={"num_cpus": args.num_cpus / args.replicas}, logging_config=logging_config)
    class Sentiment:
        def __init__(self) -> None:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            torch.set_num_threads(args.threads)
            self.torch = torch
            self.tokenizer = AutoTokenizer.from_pretrained(args.model)
            self.model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
            if args.int8:
                self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
            self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.max_wait_ms / 1000.0)
        async def classify(self, texts: list[str]) -> list[dict]:
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=args.max_length,
                                     return_tensors="pt")
            with self.torch.inference_mode():
                probs = self.model(input_ids=encoded["input_ids"],
                                   attention_mask=encoded["attention_mask"]).logits.softmax(-1)
            scores, indices = probs.max(-1)
            pairs = zip(indices.tolist(), scores.tolist(), strict=True)
            return [{"label": self.labels[i], "score": s} for i, s in pairs]

        async def __call__(self, request) -> dict:
            body = await request.json()
            texts = [body["text"]] if "text" in body else body["texts"]
            return {"predictions": list(await asyncio.gather(*(self.classify(text) for text in texts)))}

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=logging_config)
    serve.run(Sentiment.bind(), name="sentiment", route_prefix="/predict")
    print(f"ray serve ready on 127.0.0.1:{args.port} (ray {ray.__version__})", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
