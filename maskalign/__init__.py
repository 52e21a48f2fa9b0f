"""The model side of MaskAlign, apart from any training plumbing: frozen teachers, masking, Dynamic
Alignment and the student's position embedding. `models_maskalign.py` plus this package is the whole set a
model needs, so it drops into an MAE fork without touching the fork's `util/` (README, "Into an existing MAE
fork")."""
