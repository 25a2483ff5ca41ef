"""TorchServe handler for an HF sequence-classification checkpoint; runs in TorchServe's Python worker.

The .mar carries this file and ``settings.json`` (checkpoint directory, threads, max length, int8); the
weights are loaded from the checkpoint directory. A request is ``{"text"}`` or ``{"texts"}`` (JSON);
TorchServe's batcher hands ``handle`` up to ``batchSize`` requests, whose texts run as one batch; each
request is answered ``{"predictions": [{"label", "score"}]}``.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler


class SentimentHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "settings.json")) as handle:
            settings = json.load(handle)
        torch.set_num_threads(int(settings["threads"]))
        self.max_length = int(settings["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(settings["checkpoint"])
        self.model = AutoModelForSequenceClassification.from_pretrained(settings["checkpoint"]).eval()
        if settings.get("int8"):
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.initialized = True

    @staticmethod
    def _texts(row: dict) -> list[str]:
        body = row.get("data") if row.get("data") is not None else row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        return [body["text"]] if "text" in body else list(body["texts"])

    def handle(self, data: list[dict], context) -> list[dict]:
        per_request = [self._texts(row) for row in data]
        texts = [text for texts in per_request for text in texts]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        with torch.inference_mode():
            probs = self.model(input_ids=encoded["input_ids"],
                                   attention_mask=encoded["attention_mask"]).logits.softmax(-1)
        scores, indices = probs.max(-1)
        predictions = [{"label": self.labels[i], "score": s}
                       for i, s in zip(indices.tolist(), scores.tolist(), strict=True)]
        answers, start = [], 0
        for texts in per_request:
            answers.append({"predictions": predictions[start:start + len(texts)]})
            start += len(texts)
        return answers
