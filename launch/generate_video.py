"""Generate a video (Wan) or an image (Flux) with a diffusers pipeline, the transformer context-parallel over ranks.

    torchrun --standalone --nproc-per-node 2 launch/generate_video.py --cp 2          # gloo on CPU, NCCL on GPUs
    python launch/generate_video.py --cp 2                                            # same, spawning the ranks
    python launch/generate_video.py --cp 3 --model flux --steps 8 --check
    torchrun --nproc-per-node 8 launch/generate_video.py --cp 8 --pretrained /path/to/Wan2.1-T2V-1.3B-Diffusers \\
        --height 480 --width 832 --frames 81 --steps 50 --provider flash

The pipeline is diffusers' own (WanPipeline, FluxPipeline), called as without context parallelism; the only
addition is one line before it::

    parallelize(pipe.transformer, mesh, provider=args.provider)

Every rank runs the pipeline with the same seed, so every rank draws the same noise and the same scheduler steps;
inside each transformer call, each rank holds its shard of the video tokens (Wan: after patchify and RoPE; Flux:
the image tokens, with the text whole on every rank in front of them) and the output is gathered before
unpatchify. Without --pretrained the components are tiny random-weight ones built from configs (nothing is
downloaded) and the prompt embeddings are random, so the "video" is noise of the right shape: the run shows the
mechanics and their speed, not a picture. With --check, every rank also runs the same pipeline on one process
(the transformer with its own attention) and the summary gives the largest difference of the two outputs.
Rank 0 shows the pipeline's progress bar and prints one summary line at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from spawn import init_cp_world  # noqa: E402

from cpattn.integrations.diffusers import parallelize, unparallelize  # noqa: E402

TEXT_TOKENS = 12  # random prompt embeddings stand in for the text encoder's output


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=None, help="context-parallel ranks (default: the world size); "
                   "with plain python, the ranks to spawn")
    p.add_argument("--model", choices=("wan", "flux"), default="wan", help="tiny components of this pipeline "
                   "(with --pretrained: the pipeline's own)")
    p.add_argument("--pretrained", default=None, help="a local pipeline directory instead of tiny components")
    p.add_argument("--prompt", default="a red fox running through snow", help="with --pretrained only")
    p.add_argument("--provider", default="auto")
    p.add_argument("--schedule", default="auto", choices=("auto", "ring", "ulysses", "allgather"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on GPUs, float32 on CPU")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=9, help="Wan: 4k + 1 frames")
    p.add_argument("--guidance", type=float, default=5.0, help="Wan's classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="also run on one process and compare the outputs")
    p.add_argument("--save", default=None, help="rank 0 writes the output tensor here (torch.save)")
    return p.parse_args(argv)


def _cast(transformer, dtype):
    # float32 is how it was built; casting anyway would make diffusers warn about its float32-only modules
    return transformer if dtype == torch.float32 else transformer.to(dtype)


def tiny_wan(dtype):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128,
                                        num_layers=2, rope_max_seq_len=64)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=_cast(transformer, dtype))
    return pipe, 32


def tiny_flux(dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=_cast(transformer, dtype))
    return pipe, 32


def build_pipeline(args, dtype):
    torch.manual_seed(args.seed)  # the same weights on every rank
    if args.pretrained:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.pretrained, torch_dtype=dtype)
        args.model = "wan" if "Wan" in type(pipe).__name__ else "flux"  # which call arguments it takes
        return pipe, None
    return (tiny_wan if args.model == "wan" else tiny_flux)(dtype)


def call_kwargs(args, text_dim: int | None, dtype) -> dict:
    """What the pipeline is called with: the same on every rank (one seed)."""
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=args.steps, output_type="pt",
                  generator=torch.Generator().manual_seed(args.seed))
    if args.model == "wan":
        kwargs.update(num_frames=args.frames, guidance_scale=args.guidance)
    if text_dim is None:  # a real pipeline: its own text encoder
        return dict(kwargs, prompt=args.prompt)
    gen = torch.Generator().manual_seed(args.seed + 1)
    embeds = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    if args.model == "wan":
        return dict(kwargs, prompt_embeds=embeds(1, TEXT_TOKENS, text_dim),
                    negative_prompt_embeds=embeds(1, TEXT_TOKENS, text_dim))
    return dict(kwargs, prompt_embeds=embeds(1, TEXT_TOKENS, text_dim), pooled_prompt_embeds=embeds(1, 16))


def output_of(result) -> torch.Tensor:
    return result.frames if hasattr(result, "frames") else result.images


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device, mesh = init_cp_world(args.cp, args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    pipe, text_dim = build_pipeline(args, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=rank != 0, desc=f"{args.model} cp={world}", file=sys.stderr)
    parallelize(pipe.transformer, mesh, provider=args.provider, cp_strategy=args.schedule)

    start = time.perf_counter()
    with torch.inference_mode():
        out = output_of(pipe(**call_kwargs(args, text_dim, dtype)))
    elapsed = time.perf_counter() - start
    parity = ""
    if args.check:
        unparallelize(pipe.transformer)  # the same pipeline on this process alone, its own attention
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            reference = output_of(pipe(**call_kwargs(args, text_dim, dtype)))
        parity = f"; max |output - one process| {(out.float() - reference.float()).abs().max().item():.1e}"
    if rank == 0:
        if args.save:
            torch.save(out.cpu(), args.save)
        name = args.pretrained or f"{args.model} (tiny)"
        params = sum(p.numel() for p in pipe.transformer.parameters())
        print(f"generate_video: {name}, transformer {params / 1e6:.2f}M params, cp={world} ({dist.get_backend()} on "
              f"{device.type}), provider={args.provider}, {args.steps} steps, output {tuple(out.shape)}, "
              f"{elapsed:.2f} s ({elapsed / args.steps:.2f} s/step){parity}", flush=True)
    dist.barrier()  # every rank is done with every collective before any leaves (see spawn.exit_rank)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from spawn import launch

    launch(main, parse_args().cp or 1)  # under torchrun: this rank; else spawn --cp ranks
