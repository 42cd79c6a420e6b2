"""EVF_SAM_PROMPT_GRAPHS reaches the model the jobs load: graphs attached when "on" ("auto" only on
CUDA), and a CPU model still answers through the eager prompt path; jobs ask for masks and scores only."""

from __future__ import annotations

import numpy as np
import pytest

from backend import jobs
from backend.settings import Settings
from tests.evf_sam.conftest import shapes_image


@pytest.mark.parametrize("value, attached", [("on", True), ("auto", False), ("off", False)])
def test_the_jobs_model_gets_prompt_graphs_as_configured(monkeypatch, tiny_checkpoint, value, attached):
    monkeypatch.setenv("EVF_SAM_PROMPT_GRAPHS", value)
    settings = Settings(EVF_SAM_CHECKPOINT=str(tiny_checkpoint), EVF_SAM_DEVICE="cpu")
    predictor = jobs._load_runtime(settings, str(tiny_checkpoint)).predictor
    assert (getattr(predictor.model, "prompt_graphs", None) is not None) == attached
    assert predictor.return_logits is False
    [prediction] = predictor.predict(shapes_image(48, 64), ["a cat"])
    assert prediction.logits is None and prediction.mask.shape == (48, 64) and prediction.mask.dtype == np.bool_
    if attached:
        assert predictor.model.prompt_graphs.buckets == []  # the CPU runs the eager path: nothing was captured
