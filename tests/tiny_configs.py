"""Tiny model configs (``--set`` overrides of python -m sopo_ext.pretrain) shared by the tests
that pretrain throwaway checkpoints in seconds."""
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
