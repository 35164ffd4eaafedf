"""The released models, architecture for architecture: official MDM (GuyTevet/motion-diffusion-
model), and, as they are added, official MLD, TMR and the T2M evaluator. Each is verified against
fixtures made by running the official repositories' own classes
(``tests/fixtures/official/make_*_fixtures.py``); none of their code is part of this package.

    release.load_mdm_release(DIR_OR_PT)   a released MDM save directory -> Checkpoint
    mdm.OfficialMDM                       its architecture (state-dict keys as the release's)
"""
