"""Shared by the official-model tests: a released-MDM save directory, small CLIP text-tower
weights, and a HumanML3D-layout directory made from the real clip in ../shared (and its mirror)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
def _sample_dir() -> Path:
    """The real HumanML3D sample: $SOPO_EXT_HUMANML3D_SAMPLE, ../shared beside the checkout, or the
    workplace's /work/shared (a CI clone may live elsewhere)."""
    cands = [os.environ.get("SOPO_EXT_HUMANML3D_SAMPLE"),
             Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "humanml3d-sample",
             Path("/work/shared/data/humanml3d-sample")]
    for c in cands:
        if c and (Path(c) / "new_joint_vecs" / "012314.npy").is_file():
            return Path(c)
    return Path(cands[1])


SAMPLE_DIR = _sample_dir()

RELEASE_ARGS = {"dataset": "humanml", "arch": "trans_enc", "latent_dim": 32, "layers": 1,
                "diffusion_steps": 50, "noise_schedule": "cosine", "cond_mask_prob": 0.1,
                "pos_embed_max_len": 1000, "text_encoder_type": "clip", "emb_trans_dec": False,
                "mask_frames": False}


def make_release(d: Path, args: dict = RELEASE_ARGS, seed: int = 0) -> Path:
    """A save directory as the release writes it: args.json and model<step>.pt (the state dict
    without CLIP, the positional tables included)."""
    from sopo_ext.official.mdm import OfficialMDM
    from sopo_ext.official.release import mdm_config_from_args
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps(args))
    torch.manual_seed(seed)
    torch.save(OfficialMDM(mdm_config_from_args(args)).state_dict(), d / "model000050000.pt")
    return d


def make_clip_weights(path: Path, seed: int = 1) -> Path:
    """Random weights of a one-layer, 64-wide CLIP text tower (the encoder reads the shape off
    the file): CLIP's tokenizer and pooling with a test-sized model."""
    from open_clip.model import CLIPTextCfg, _build_text_tower
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    tower = _build_text_tower(512, CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1,
                                               layers=1), quick_gelu=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items() if k != "attn_mask"}, str(path))
    return path


def sample_humanml3d_dir(root: Path) -> Path:
    """HumanML3D's layout around the real clip 012314 and its mirror M012314 (the mirror made by
    sopo_ext.data.skeleton.mirror_features, as HumanML3D's own M files are): the real Mean/Std,
    captions (whole clip and three segments each, so 8 samples), and one split file per split
    holding both ids. For pipeline conformance on real features, not for measuring anything."""
    from sopo_ext.data.skeleton import mirror_features
    feats = np.load(SAMPLE_DIR / "new_joint_vecs" / "012314.npy")
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    np.save(root / "new_joint_vecs" / "012314.npy", feats)
    np.save(root / "new_joint_vecs" / "M012314.npy",
            mirror_features(torch.from_numpy(feats)).numpy().astype(np.float32))
    for stat in ("Mean.npy", "Std.npy"):
        np.save(root / stat, np.load(SAMPLE_DIR / stat))
    lines = {"012314": ("a person moves the left arm", "left"), "M012314": ("a person moves the right arm", "right")}
    for cid, (cap, side) in lines.items():
        tags = f"a/DET person/NOUN move/VERB the/DET {side}/ADJ arm/NOUN"
        segs = ["0.0#0.0", "0.0#4.0", "2.0#6.0", "4.0#8.5"]
        (root / "texts" / f"{cid}.txt").write_text("".join(f"{cap}#{tags}#{s}\n" for s in segs))
    for split in ("train", "val", "test"):
        (root / f"{split}.txt").write_text("012314\nM012314\n")
    return root


def _t2m_meta() -> dict:
    return json.loads((FIX / "t2m_small.json").read_text())


def t2m_release_layout(root: Path, mean=None, std=None, layout="mdm") -> Path:
    """The files as a user of MDM has them: t2m/text_mot_match/model/finest.tar, glove/our_vab_*,
    dataset/t2m_mean.npy / t2m_std.npy (layout 'mdm') or t2m/Comp_v6_KLD01/meta (layout 'meta')."""
    (root / "t2m" / "text_mot_match" / "model").mkdir(parents=True)
    shutil.copy(FIX / "t2m_small_finest.tar", root / "t2m" / "text_mot_match" / "model" / "finest.tar")
    (root / "glove").mkdir()
    np.save(root / "glove" / "our_vab_data.npy", np.asarray(_t2m_meta()["vectors"], dtype=np.float32))
    pickle.dump(_t2m_meta()["words"], open(root / "glove" / "our_vab_words.pkl", "wb"))
    pickle.dump({w: i for i, w in enumerate(_t2m_meta()["words"])}, open(root / "glove" / "our_vab_idx.pkl", "wb"))
    mean = np.zeros(263, np.float32) if mean is None else mean
    std = np.ones(263, np.float32) if std is None else std
    d = root / "dataset" if layout == "mdm" else root / "t2m" / "Comp_v6_KLD01" / "meta"
    d.mkdir(parents=True)
    np.save(d / ("t2m_mean.npy" if layout == "mdm" else "mean.npy"), mean)
    np.save(d / ("t2m_std.npy" if layout == "mdm" else "std.npy"), std)
    return root
