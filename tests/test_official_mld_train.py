"""The released MLD in the package's jobs: python -m sopo_ext.train --backbone mld-official
--base <its Lightning .ckpt> and evaluate on the fine-tune, on the tiny data; diffusers' "leading"
DDIM steps the release samples with; CLIP ViT-L/14's features of "" as the null condition.

The checkpoint is the official-class fixture (tests/fixtures/official/mld_small_humanml3d.ckpt,
see test_official_mld.py); the text encoder a one-layer CLIP text model with a character-level
vocabulary, saved as transformers saves CLIP (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sopo_ext import checkpoint as C
from sopo_ext import evaluate, train
from sopo_ext.diffusion import DiffusionConfig, GaussianDiffusion
from sopo_ext.official.mld_backbone import OfficialMLD, load_official_mld

CKPT = Path(__file__).resolve().parent / "fixtures" / "official" / "mld_small_humanml3d.ckpt"


def tiny_clip_l14(root: Path) -> Path:
    """CLIP's tokenizer files with one token per character, and a one-layer text model whose
    projection is 768 wide, like ViT-L/14's."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    root.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root)
    torch.manual_seed(3)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=768,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModelWithProjection(cfg).save_pretrained(root)
    return root


def test_leading_spacing_is_diffusers_ddim_with_steps_offset_1():
    d = GaussianDiffusion(DiffusionConfig(num_steps=1000, schedule="scaled_linear", prediction="eps",
                                          spacing="leading"))
    ts = d.sampling_timesteps(50)
    assert ts == list(range(981, 0, -20)) and len(ts) == 50
    s = d.respaced_schedule(50)
    abar = d.alphas_cumprod
    # diffusers: prev = t - 1000 // 50; alpha_prod_prev = abar[prev] if prev >= 0 else abar[0]
    want = torch.stack([abar[t - 20] if t - 20 >= 0 else abar[0] for t in ts])
    torch.testing.assert_close(s["alphas_cumprod_prev"], want)
    assert GaussianDiffusion(DiffusionConfig()).sampling_timesteps(50)[0] == 999  # linspace unchanged
    with pytest.raises(ValueError, match="spacing"):
        DiffusionConfig(spacing="trailing")


def test_the_release_loads_as_a_backbone_with_its_sampling_meta():
    ck = load_official_mld(CKPT)
    assert ck.kind == "mld_official" and isinstance(ck.model, OfficialMLD)
    assert ck.meta["diffusion"]["spacing"] == "leading" and ck.meta["guidance"] == 7.5
    m = ck.model
    x = torch.randn(2, *m.latent_shape)
    text = torch.randn(2, 768)
    with torch.no_grad():
        out = m(x, torch.tensor([5, 900]), text)
        ref = m.denoiser(x, torch.tensor([5, 900]), text[:, None, :])[0]
    torch.testing.assert_close(out, ref)  # the interface is the release's denoiser, batch-first
    with pytest.raises(ValueError, match="empty caption"):
        m(x, torch.tensor([5, 900]), text, uncond=torch.tensor([True, False]))
    m.set_null_text(torch.ones(768))
    with torch.no_grad():
        mixed = m(x, torch.tensor([5, 900]), text, uncond=torch.tensor([True, False]))
        null = m.denoiser(x[:1], torch.tensor([5]), torch.ones(1, 1, 768))[0]
    torch.testing.assert_close(mixed[0], null[0])
    torch.testing.assert_close(mixed[1], ref[1])
    motion = torch.randn(2, 6, 263)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        z = m.encode(motion, mask)
        back = m.decode(z, mask)
    assert z.shape == (2, *m.latent_shape) and back.shape == (2, 6, 263) and (back[1, 4:] == 0).all()


def test_train_and_evaluate_the_released_mld(tiny_assets, tmp_path, capsys):
    a = tiny_assets
    clip = tiny_clip_l14(tmp_path / "clip-vit-large-patch14")
    out = tmp_path / "run"
    rc = train.main(["--backbone", "mld-official", "--base", str(CKPT), "--clip-weights", str(clip),
                     "--data", str(a["data"]), "--reward", str(a["reward"]), "--evaluator", "none",
                     "--out", str(out), "--steps", "2", "--batch-size", "4", "--k", "2", "--sampling-steps", "2",
                     "--warmup", "1", "--no-animation", "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    tuned = C.load_checkpoint(out / "model", "mld_official")
    base = load_official_mld(CKPT).model
    assert bool(tuned.model.null_ready)  # CLIP's features of "" travel with the fine-tune
    sd, bd = tuned.model.state_dict(), base.state_dict()
    assert any(not torch.equal(sd[k], bd[k]) for k in sd if k.startswith("denoiser."))  # trained
    enc_keys = [k for k in sd if k.startswith(("vae.skel_embedding", "vae.encoder.", "vae.global_motion_token"))]
    assert enc_keys and all(torch.equal(sd[k], bd[k]) for k in enc_keys)  # the encoder stayed frozen
    j = tmp_path / "e.json"
    rc = evaluate.main(["--ckpt", str(out / "model"), "--clip-weights", str(clip), "--data", str(a["data"]),
                        "--evaluator", str(a["evaluator"]), "--reward", str(a["reward"]), "--samples", "32",
                        "--steps", "2", "--mm-captions", "0", "--replications", "1", "--json", str(j)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(j.read_text())
    assert doc["guidance"] == 7.5 and 0 <= doc["summary"]["R-precision top1"]["mean"] <= 1
