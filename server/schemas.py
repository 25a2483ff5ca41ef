"""HTTP request and response bodies (the contract of DESIGN.md's API table)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PredictRequest(BaseModel):
    """Either ``text`` or ``texts``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a gripping, funny film"}]})

    text: str | None = Field(None, description="one text")
    texts: list[str] | None = Field(None, description="several texts; predictions come back in the same order")

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError('send exactly one of "text" (a string) or "texts" (a list of strings)')
        if self.texts is not None and not self.texts:
            raise ValueError('"texts" must hold at least one string')
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class PredictionOut(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]
    cached: bool


class ModelOut(BaseModel):
    name: str
    version: str
    variant: str
    provider: str
    device: str


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]
    model: ModelOut
    request_id: str | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: str | None = Field(None, description="artifact directory; default: the configured MODEL_PATH")
