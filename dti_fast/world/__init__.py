"""A procedural toy world in which personalization quality is measurable on a CPU (issue 16).

Scenes are rendered from seeded specs (:mod:`.render`), described by a caption grammar, and
a small Stable-Diffusion-layout model is trained on them from scratch (:mod:`.base`). Novel
concepts (:mod:`.concepts`) are objects and a style no caption names; :mod:`.scoring` measures
text fidelity and subject similarity from pixels; :mod:`.suite` runs the TI / TI-rescaled /
DTI comparison with the project's own trainer.
"""
