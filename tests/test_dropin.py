"""The drop-in checks: what makes the policy and the reference forwards differ at step 0."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sopo_ext
from sopo_ext.dropin import DropInWarning, check_dropin, train_mode_randomness


class OfficialLikeMDM(nn.Module):
    """The official MDM's relevant traits: dropout 0.1, cond_mask_prob 0.1, an unmasked forward."""

    def __init__(self):
        super().__init__()
        self.cond_mask_prob = 0.1
        self.drop = nn.Dropout(0.1)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.drop(x))


def test_train_mode_dropout_and_text_drop_are_named():
    m = OfficialLikeMDM()
    assert train_mode_randomness(m) == ["dropout (p = 0.1)", "text drop (cond_mask_prob = 0.1)"]
    assert train_mode_randomness(m.eval()) == []
    ref = copy.deepcopy(m).eval()
    with pytest.warns(DropInWarning, match="policy is in train mode with dropout"):
        problems = check_dropin(m.train(), ref)
    assert len(problems) == 1
    # what the warning is about: at step 0 the two forwards differ
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    assert not torch.equal(m(x), ref(x))
    assert torch.equal(m.eval()(x), ref(x))


def test_this_packages_mdm_in_train_mode_is_caught_too():
    from sopo_ext.models.mdm import MDM, MDMConfig
    m = MDM(MDMConfig(nfeats=8, max_frames=16, d_model=16, num_layers=1, num_heads=2, ff_size=16,
                      text_dim=8))
    found = train_mode_randomness(m.train())
    assert any("dropout" in f for f in found) and any("cond_drop_prob" in f for f in found)
    assert train_mode_randomness(m.eval()) == []
    # a dropout left in train mode under an eval() parent still counts
    m.eval()
    next(x for x in m.modules() if isinstance(x, nn.Dropout)).train()
    assert train_mode_randomness(m) == ["dropout (p = 0.1)"]


def test_inputs_must_be_identical_and_zero_at_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # [B, T]
    x = torch.randn(2, 4, 3) * mask[..., None]
    assert check_dropin(x_policy=x, x_reference=x.clone(), mask=mask, strict=True) == []
    noisy = x + 0.1 * torch.randn_like(x) * ~mask[..., None]
    with pytest.raises(ValueError, match="not zero at padded frames"):
        check_dropin(x_policy=noisy, x_reference=noisy, mask=mask, strict=True)
    with pytest.warns(DropInWarning, match="inputs differ"):
        check_dropin(x_policy=x, x_reference=x + 1e-7)
    with pytest.warns(DropInWarning, match="different shapes"):
        check_dropin(x_policy=x, x_reference=x[:, :3])
    # separate noise for the reference (the official SoPo code) is allowed when said so
    assert check_dropin(x_policy=x, x_reference=x + 1e-7, shared_noise=False, strict=True) == []
    # the official MDM layout: x [B, 263, 1, T] with mask [B, 1, 1, T]
    xm = torch.randn(2, 5, 1, 4) * mask[:, None, None, :]
    assert check_dropin(x_policy=xm, x_reference=xm, mask=mask[:, None, None, :]) == []
    with pytest.raises(ValueError, match="does not broadcast"):
        check_dropin(x_policy=xm, x_reference=xm, mask=torch.ones(3, 7, dtype=torch.bool))


def test_sopo_loss_check_and_a_clean_setup_is_silent():
    m = OfficialLikeMDM().eval()
    loss_fn = sopo_ext.SoPoLoss()
    x = torch.randn(2, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loss_fn.check(m, copy.deepcopy(m), x_policy=x, x_reference=x) == []
    with pytest.raises(ValueError, match="SoPo drop-in check failed"):
        loss_fn.check(m.train(), None, strict=True)
