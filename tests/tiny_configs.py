"""Tiny model configs (``--set`` overrides of python -m sopo_ext.pretrain) and tiny pretrained
checkpoints, shared by the tests that need throwaway models in seconds."""
from pathlib import Path

from sopo_ext import pretrain
from sopo_ext.data import synthetic

TINY = {
    "reward": ["d_model=16", "num_layers=1", "num_heads=2", "ff_size=32", "latent_dim=8",
               "text_hidden=16"],
    "evaluator": ["word_dim=8", "text_hidden=16", "movement_hidden=16", "movement_dim=16",
                  "motion_hidden=16", "embed_dim=16"],
    "mdm": ["d_model=16", "num_layers=1", "num_heads=2", "ff_size=32"],
    "mld": ["vae.d_model=16", "vae.encoder_layers=1", "vae.decoder_layers=1", "vae.num_heads=2",
            "vae.ff_size=32", "vae.latent_dim=8", "denoiser.d_model=16", "denoiser.num_layers=1",
            "denoiser.num_heads=2", "denoiser.ff_size=32", "denoiser.latent_dim=8"],
}


def make_tiny_assets(root: Path) -> dict:
    """A tiny dataset (400 motions: a 40-sample test split) and tiny checkpoints pretrained for
    2 steps each with the hashing text encoder. Set SOPO_EXT_CACHE before calling."""
    data = root / "data"
    synthetic.generate(data, num=400, seed=1)
    ckpts = {}
    for model in ("reward", "evaluator", "mdm", "mld"):
        out = root / model
        a = [model, "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "8",
             "--text-encoder", "hash", "--no-progress", "--threads", "1", "--ckpt-every", "100",
             "--warmup", "1", "--evaluator", "none", "--reward", "none", "--no-final-eval"]
        if model == "mld":
            a += ["--vae-steps", "2"]
        assert pretrain.main(a + ["--set", *TINY[model]]) == 0
        ckpts[model] = out / "model"
    return {"root": root, "data": data, **ckpts}
