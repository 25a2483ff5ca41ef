"""How much a variant's answer for a text depends on the texts it shares an engine call with.

Each text is run alone and then in a batch with other texts drawn at random from the same file; the script prints
how many labels changed and how far the probabilities moved. int8's dynamic quantization computes activation
scales over the whole batch, so its answers move; fp32 and fp16 compute each row on its own.

    python scripts/bench_batch_effect.py --artifact models/default --variant int8 \
        --data ../shared/data/sst2/dev.tsv --limit 300 --batch 2
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from models.data import load_labeled  # noqa: E402
from server.artifact import load_artifact  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.engine import OnnxEngine, softmax  # noqa: E402
from server.tokenizer import TextEncoder, pad_batch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("models/default"))
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--data", type=Path, required=True, help="a labeled TSV or CSV file (its texts are used)")
    parser.add_argument("--limit", type=int, default=300, help="texts measured (the first of the file)")
    parser.add_argument("--batch", type=int, default=2, help="texts per shared engine call (the measured one first)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    artifact = load_artifact(args.artifact)
    engine = OnnxEngine(artifact, args.variant, "cpu", load_settings(intra_op_threads=1))
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    texts = load_labeled(args.data).texts
    draw = random.Random(args.seed)
    flips, moved = 0, []
    for text in texts[: args.limit]:
        alone = softmax(engine.run(*pad_batch(encoder.encode([text]))))[0]
        shared = softmax(engine.run(*pad_batch(encoder.encode([text, *draw.choices(texts, k=args.batch - 1)]))))[0]
        flips += int(alone.argmax() != shared.argmax())
        moved.append(float(np.abs(alone - shared).max()))
    measured = len(moved)
    print(f"{args.variant}, {measured} texts of {args.data}, each alone and in a batch of {args.batch} with random "
          f"others: {flips} labels changed ({flips / measured:.1%}); probability moved by p50 {np.median(moved):.2g}, "
          f"p99 {np.percentile(moved, 99):.2g}, max {max(moved):.2g}")


if __name__ == "__main__":
    main()
