"""Model code shared by training, clustering and evaluation.

encoders (timm ViT presets, the global-descriptor model, preprocessing), the Siamese MIM
decoder, the heads (pair classifier, CosFace), MulConv adapters, activation checkpointing of
the block loops (recompute) and the model-checkpoint contract. It
imports only the core (`placeforge`) and never a stage above it.
"""
