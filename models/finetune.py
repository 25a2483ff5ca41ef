"""Fine-tune a sequence-classification model on a labeled TSV/CSV file.

Seeded and resumable: the data order of each epoch is a function of the seed
and the epoch, and ``state.pt`` (written at every evaluation) holds weights,
optimizer, scheduler and step, so an interrupted run continues where it
stopped. The best checkpoint by dev accuracy is kept as a normal Hugging Face
checkpoint in ``<out>/best``.

With ``--ema-decay`` (e.g. 0.999) an exponential moving average of the weights
is kept beside the trained ones and evaluated too; either can become ``best``.
Averaging smooths the last steps' noise, which on small encoders is worth a
few tenths of a point of accuracy for the price of one extra evaluation.

Labels: a base that is already a classifier with named labels (a model you
serve, retrained on its exported feedback) keeps its labels and head; any
other base gets a fresh NEGATIVE/POSITIVE head. The files' labels are matched
to those names (``models.labels``: the same name in any case, or SST-2's
0 = negative / 1 = positive), so ``sentiment-analyzer feedback export``'s
named labels and SST-2's 0/1 both train the right output.

    python -m models.finetune --base minilm --train ../shared/data/sst2/train.tsv \
        --dev ../shared/data/sst2/dev.tsv --out build/finetune
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from models.data import load_labeled
from models.export import labels_of
from models.labels import label_positions
from models.minilm import LABELS, build_classifier_from_bert_dir, minilm_dir

MINILM = "minilm"


@dataclass
class TrainConfig:
    base: str
    train: str
    dev: str
    out: str
    epochs: float = 2.0
    lr: float = 1e-4
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 128
    eval_every: int = 400
    seed: int = 42
    threads: int = 0
    train_limit: int | None = None
    ema_decay: float = 0.0


def load_base(base: str, seed: int):
    """(model, tokenizer) for a Hub id, a local checkpoint directory, or ``minilm`` (labels: module docstring)."""
    if base == MINILM:
        return build_classifier_from_bert_dir(minilm_dir(), seed=seed), AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(seed)
    if is_named_classifier(AutoConfig.from_pretrained(base)):
        return AutoModelForSequenceClassification.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    return model, AutoTokenizer.from_pretrained(base)


def is_named_classifier(config) -> bool:
    """A sequence-classification checkpoint whose labels have names (not Hugging Face's LABEL_<i>)."""
    heads = [a for a in config.architectures or [] if a.endswith("ForSequenceClassification")]
    names = [str(label) for label in config.id2label.values()]
    return bool(heads) and not all(name.upper().startswith("LABEL_") for name in names)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Examples:
    """Texts and their targets as logit positions of the model being trained."""

    texts: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def load_examples(path: str, labels: list[str], limit: int | None = None) -> Examples:
    data = load_labeled(path, limit=limit)
    return Examples(data.texts, label_positions(data.labels, labels))


def batches(data: Examples, order: list[int], batch_size: int, tokenizer, max_length: int):
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [data.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([data.targets[i] for i in idx])


@torch.no_grad()
def accuracy(model, tokenizer, data: Examples, max_length: int, batch_size: int = 64) -> float:
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.texts[i]))
    correct = 0
    for ids, mask, labels in batches(data, order, batch_size, tokenizer, max_length):
        correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / max(len(data), 1)


def fine_tune(cfg: TrainConfig) -> dict:
    """Train, evaluating every ``eval_every`` steps; returns the best dev result."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, tokenizer = load_base(cfg.base, cfg.seed)
    train = load_examples(cfg.train, labels_of(model), limit=cfg.train_limit)
    dev = load_examples(cfg.dev, labels_of(model))
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * cfg.warmup_ratio), total_steps)

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay else None

    step, best = 0, {"accuracy": -1.0, "step": 0}
    state_file = out / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, best = state["step"], state["best"]
        print(f"resumed from step {step} (best dev accuracy so far {best['accuracy']:.4f})", flush=True)
    log = (out / "train_log.jsonl").open("a")
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def evaluate_and_checkpoint() -> None:
        nonlocal best
        candidates = {"trained": model} | ({"ema": ema.module} if ema is not None else {})
        scores = {name: accuracy(m, tokenizer, dev, cfg.max_length) for name, m in candidates.items()}
        record = {"step": step, "epoch": step / steps_per_epoch, "dev_accuracy": scores["trained"], "time": time.time()}
        if ema is not None:
            record["ema_dev_accuracy"] = scores["ema"]
        log.write(json.dumps(record) + "\n")
        log.flush()
        tqdm.write(json.dumps(record))
        weights, acc = max(scores.items(), key=lambda item: item[1])
        if acc > best["accuracy"]:
            best = {"accuracy": acc, "step": step, "weights": weights}
            candidates[weights].save_pretrained(out / "best")
            tokenizer.save_pretrained(out / "best")
            (out / "best" / "dev_result.json").write_text(json.dumps(best))
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "step": step, "best": best},
            state_file,
        )

    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="fine-tune", mininterval=10)
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(cfg.seed + epoch).shuffle(order)
        remaining = order[skip * cfg.batch_size :]
        for ids, mask, labels in batches(train, remaining, cfg.batch_size, tokenizer, cfg.max_length):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=False)
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % cfg.eval_every == 0 or step == total_steps:
                evaluate_and_checkpoint()
            if step >= total_steps:
                break
    progress.close()
    log.close()
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=MINILM, help="Hub id, local checkpoint dir, or 'minilm' (offline default)")
    parser.add_argument("--train", required=True)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--out", required=True)
    for field in ("epochs", "lr", "batch_size", "warmup_ratio", "weight_decay", "max_length", "eval_every", "seed",
                  "threads", "train_limit", "ema_decay"):
        default = TrainConfig.__dataclass_fields__[field].default
        parser.add_argument(f"--{field.replace('_', '-')}", type=float if isinstance(default, float) else int,
                            default=default)
    args = parser.parse_args(argv)
    print(json.dumps(fine_tune(TrainConfig(**vars(args)))))


if __name__ == "__main__":
    main()
