"""Tiny, offline, deterministic LTX-2 and LTX-Video pipelines for tests.

Everything is built from random weights (seeded) and a word-level tokenizer made with the ``tokenizers``
library, then ``save_pretrained`` to a folder, so ``LTX2Pipeline.from_pretrained(path)`` /
``LTXPipeline.from_pretrained(path)`` work with no network.

Sizes: the configs follow diffusers' own fast tests (tests/pipelines/ltx2/test_ltx2.py, tests/pipelines/ltx/test_ltx.py)
but widened so that the linear layers a quantizer cares about have ``in_features`` that are multiples of 64 (and
the feed-forward down projections / text-encoder MLP of 128), so tiles 16/32/64 work everywhere and tile 128 on
the feed-forward and MLP down projections:

* LTX-2 transformer: video inner dim 64 (4 heads x 16), audio inner dim 64 (4 x 16), FF inner 256, 2 layers,
  caption channels 64.  Gemma-3 text encoder: hidden 64, 2 layers, MLP 128.
* LTX-Video transformer: inner dim 64 (4 x 16), FF inner 256, 2 layers, caption channels 64.  T5 encoder: d_model 64,
  d_ff 128, 2 layers.

``run_tiny_pipeline`` generates a 9-frame 32x32 video in 2 steps on CPU (a few seconds) and returns the frames as a
float32 numpy array (frames, height, width, 3) in [0, 1].
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

# A small fixed vocabulary: the tokenizer is word-level, unknown words map to <unk>.
_WORDS = (
    "a an the robot cat dog dancing dance monkey running in on of with and red blue green small big video "
    "city street night day sky sea forest man woman camera slowly fast light dark moving car tree house "
    "water fire bird flying walking sitting standing looking at to from over under blurry jittery worst "
    "quality distorted inconsistent motion low high detailed cinematic shot close up wide view"
).split()

TINY_LTX2_DIMS = {"inner_dim": 64, "audio_inner_dim": 64, "caption_channels": 64, "num_layers": 2}
TINY_LTX_DIMS = {"inner_dim": 64, "caption_channels": 64, "num_layers": 2}


def _word_tokenizer(bos: bool, kind: str):
    """A PreTrainedTokenizerFast over ``_WORDS`` (ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, then words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:  # Gemma prepends <bos>
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    else:  # T5 appends </s>
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A $B <eos>", special_tokens=[("<eos>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        model_max_length=128, padding_side="left" if kind == "gemma" else "right")
    return fast


def _tiny_gemma3(vocab_size: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256,
            "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 28, "patch_size": 14,
        },
        mm_tokens_per_image=4,
    )
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(cfg).eval()


def build_tiny_ltx2_pipeline(path: str) -> str:
    """Build a tiny random LTX2Pipeline and save it to ``path`` (created). Returns ``path``."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tokenizer = _word_tokenizer(bos=True, kind="gemma")
    text_encoder = _tiny_gemma3(len(tokenizer))
    tcfg = text_encoder.config.text_config

    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=4, audio_attention_head_dim=16,
        audio_cross_attention_dim=64, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=tcfg.hidden_size, rope_double_precision=False, rope_type="split",
    )
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=tcfg.hidden_size, text_proj_in_factor=tcfg.num_hidden_layers + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=16, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=16, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False,
        causal_temporal_positioning=False, rope_type="split",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins, hidden_channels=32, out_channels=2,
        upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    )
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
        tokenizer=tokenizer, connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_ltx_pipeline(path: str) -> str:
    """Build a tiny random LTXPipeline (LTX-Video, T5 text encoder) and save it to ``path``. Returns ``path``."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _word_tokenizer(bos=False, kind="t5")
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu")).eval()
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=16,
        cross_attention_dim=64, num_layers=2, caption_channels=64,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def run_tiny_pipeline(pipe: Any, prompt: str = "a robot dancing in the city", *, num_frames: int = 9,
                      height: int = 32, width: int = 32, steps: int = 2, seed: int = 0,
                      guidance_scale: float = 1.0, **kwargs) -> np.ndarray:
    """Run ``pipe`` (LTX2Pipeline or LTXPipeline) with a fixed CPU generator.

    Returns float32 numpy frames of shape (num_frames, height, width, 3) with values in [0, 1].
    """
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    call = dict(prompt=prompt, negative_prompt="", generator=gen, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width, num_frames=num_frames,
                max_sequence_length=16, output_type="np")
    if type(pipe).__name__.startswith("LTX2"):
        call["frame_rate"] = 25.0
    call.update(kwargs)
    with torch.no_grad():
        out = pipe(**call)
    frames = np.asarray(out.frames[0], dtype=np.float32)
    return frames
