"""The one NLL: it scores the logits the model itself produces, family details included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa_search.nll import window_nll
from tests.families import TINY, tiny_family_model


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_window_nll_equals_the_models_own_loss(model_type):
    # a tight final soft-cap (Gemma 2) so that leaving it out changes the loss
    over = {"final_logit_softcapping": 0.5} if model_type == "gemma2" else {}
    model = tiny_family_model(model_type, **over)
    ids = torch.randint(
        3, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()  # Gemma 2: final soft-cap applied
    want = float(F.cross_entropy(logits, ids[1:]))
    got, count = window_nll(model, ids.tolist())
    assert count == len(ids) - 1
    assert got == pytest.approx(want, rel=1e-5)
