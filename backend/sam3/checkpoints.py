"""Build SAM 3 checkpoints with random weights in the hub's `sam3_video` layout.

Tests load a tiny one through the same `from_pretrained(dir)` path users run with
`facebook/sam3`; the benchmark builds a full-size one (same compute as the real model).
Nothing here downloads: the tokenizer is a byte-level CLIP BPE with no merges.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_WIDTH = 128  # the video tracker splits its object pointers into 64-channel memory tokens: wider than 64
TINY_VIT_WIDTH = 32
TINY_IMAGE_SIZE = 112  # a multiple of the 14-pixel patch: an 8x8 token grid


def _byte_vocab() -> dict[str, int]:
    # CLIP's byte-to-unicode table: every byte gets a printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def tiny_config():
    from transformers import Sam3Config, Sam3VideoConfig, Sam3ViTConfig
    from transformers.models.sam3_tracker_video import Sam3TrackerVideoConfig

    w, v = TINY_WIDTH, TINY_VIT_WIDTH
    vit = lambda: Sam3ViTConfig(  # noqa: E731  (a fresh object each: the tracker config rewrites its own)
        hidden_size=v, intermediate_size=2 * v, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, pretrain_image_size=TINY_IMAGE_SIZE, window_size=4,
        global_attn_indexes=[1],
    )
    def vision():
        return dict(backbone_config=vit(), fpn_hidden_size=w, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])

    layer = dict(hidden_size=w, num_layers=1, num_attention_heads=2, intermediate_size=2 * w)
    detector = Sam3Config(
        vision_config=vision(),
        text_config=dict(
            vocab_size=514, hidden_size=w, intermediate_size=2 * w, projection_dim=w, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        ),
        geometry_encoder_config=layer,
        detr_encoder_config=layer,
        detr_decoder_config=dict(layer, num_queries=8),
        mask_decoder_config=dict(hidden_size=w, num_attention_heads=2),
    )
    tracker = Sam3TrackerVideoConfig(
        image_size=TINY_IMAGE_SIZE,
        vision_config=vision(),
        prompt_encoder_config=dict(hidden_size=w, image_size=TINY_IMAGE_SIZE),
        mask_decoder_config=dict(hidden_size=w, mlp_dim=2 * w, num_attention_heads=2, iou_head_hidden_dim=w),
        memory_attention_hidden_size=w, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=2 * w,
        memory_encoder_hidden_size=w, memory_encoder_output_channels=64, mask_downsampler_embed_dim=w,
        memory_fuser_embed_dim=w, memory_fuser_intermediate_dim=2 * w, memory_fuser_num_layers=1,
        memory_attention_rope_feat_sizes=[8, 8],
    )
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker)


def build_checkpoint(out_dir: str | os.PathLike, *, tiny: bool = True, seed: int = 0) -> Path:
    """Write config, weights, tokenizer and processor files into `out_dir` and return it."""
    from transformers import CLIPTokenizer, Sam3ImageProcessor, Sam3Processor, Sam3VideoConfig, Sam3VideoModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_config() if tiny else Sam3VideoConfig()
    model = Sam3VideoModel(config).eval()
    # save_pretrained would nest the tracker as tracker_model.tracker_model.*; the hub layout is flat.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tiny:
        # Random weights call every tracked object occluded from its second frame on; a tiny model that
        # always sees its object keeps video tracks alive, so their shape can be tested.
        head = "tracker_model.mask_decoder.pred_obj_score_head.proj_out"
        state[f"{head}.weight"] = torch.zeros_like(state[f"{head}.weight"])
        state[f"{head}.bias"] = torch.full_like(state[f"{head}.bias"], 10.0)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)

    tokenizer = CLIPTokenizer(vocab=_byte_vocab(), merges=[])
    size = config.detector_config.vision_config.image_size
    image_processor = Sam3ImageProcessor(size={"height": size, "width": size})
    Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    # Readable by every user: a checkpoint built here is mounted into containers that run as another uid.
    out.chmod(0o755)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    return out


if __name__ == "__main__":  # python -m backend.sam3.checkpoints DIR [--full]
    import sys

    path = build_checkpoint(sys.argv[1], tiny="--full" not in sys.argv)
    print(path)
