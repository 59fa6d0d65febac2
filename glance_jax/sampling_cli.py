"""`glance-jax sample` and `glance-jax eval`: sampling and teacher agreement from the command line.

Prompts are encoded by the Flax text encoders of a pipeline folder
(`--text_encoders`), or come as cached text embeddings: a .safetensors file
with `prompt_embeds` (N, T, D), for FLUX
`pooled_prompt_embeds` (N, D), for Qwen-Image optionally `prompt_embeds_mask`
(N, T), and the captions as a JSON list in its metadata under "captions" (the
demo's glance_jax/demo/assets/prompts.safetensors is such a file). Images
come from the model's VAE: `--vae` (or a pipeline folder's vae/), or the
demo teacher's identity VAE (its latents are pixels); without one, sampling
and its metrics work on latents (.safetensors).
"""

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image

from glance_jax import checkpoints, data, evaluation, families, safe_io, validation
from glance_jax.checkpoints import safetensors_io
from glance_jax.demo import teacher
from glance_jax.errors import GlanceError
from glance_jax.lora import load_lora, read_guidance, read_schedule
from glance_jax.pipelines import GlancePipeline, decode_latents
from glance_jax.schedules import GlanceSchedule

EMBEDDINGS_HELP = "text embeddings file (.safetensors with prompt_embeds and a 'captions' list in its metadata)"


def _pipeline(model_path, scheduler_path=None, vae_path=None, family=None):
    """(pipeline, family) for any model folder glance-jax loads; the demo teacher (and its identity VAE) by
    default. Images come from the VAE: without one the pipeline samples latents. `family`: the pipeline
    folder's (an editing model shares its transformer class), else the model's."""
    model, params = families.load_model(model_path or teacher.TEACHER_DIR)
    family = family or families.of(model)
    if scheduler_path:
        with open(scheduler_path) as f:
            scheduler = json.load(f)
    else:
        scheduler = teacher.SCHEDULER if not model_path else family.scheduler
    vae = families.load_model(vae_path) if vae_path else None if model_path else teacher.VAE
    return GlancePipeline(model, params, scheduler, vae=vae, tiled_vae=vae is not None, family=family), family


def _embeddings(path, captions, text_encoders, family, images=()):
    """Arrays for `captions` (in order): encoded by the Flax text encoders (with the source `images`, for a family
    whose prompts see them), or read from an embeddings file."""
    if text_encoders:
        encoder = family.prompt_encoder.from_pretrained(text_encoders)
        encoded = encoder(captions, family.prompt_images(list(images))) if family.prompt_sees_images else \
            encoder(captions)
        return {k: np.asarray(v) for k, v in encoded.items()}
    f = safetensors_io.SafetensorsFile(path or teacher.PROMPTS_FILE)
    try:
        stored = json.loads(f.metadata["captions"])
    except (KeyError, ValueError):
        raise GlanceError(f"{f.path}: no 'captions' list in its metadata") from None
    if not isinstance(stored, list) or not all(isinstance(c, str) for c in stored):
        raise GlanceError(f"{f.path}: its 'captions' metadata is not a JSON list of strings")
    missing = [c for c in captions if c not in stored]
    if missing:
        raise GlanceError(f"{f.path} has no embeddings for {missing[0]!r}; it has: "
                          + ", ".join(repr(c) for c in stored[:8]) + (", ..." if len(stored) > 8 else ""))
    rows = [stored.index(c) for c in captions]
    return {k: f.read(k)[rows] for k in f.keys()}


def _parse_schedule(text, family, image_seq_len):
    if text == "official":
        return GlanceSchedule.official(family.scheduler, image_seq_len)
    slow, fast = _schedule_steps(text)
    return GlanceSchedule.from_steps(family.scheduler, slow, fast, image_seq_len)


def _same_timesteps(a, b):
    return (len(a.slow), len(a.fast)) == (len(b.slow), len(b.fast)) and np.allclose(
        a.slow + a.fast, b.slow + b.fast, rtol=0, atol=1e-3)


def _describe(schedule):
    return f"slow {', '.join(f'{t:g}' for t in schedule.slow)} | fast {', '.join(f'{t:g}' for t in schedule.fast)}"


def _glance_schedule(args, family, image_seq_len):
    """--schedule if given, else the schedule the LoRA files were trained for, else the official one.

    The LoRA files carry their schedule (`glance_jax.lora.read_schedule`); a --schedule that differs
    from it, or a slow and a fast LoRA trained for different schedules, are refused.
    """
    read = [(flag, read_schedule(path)) for flag, path in (("--slow_lora", args.slow_lora),
                                                           ("--fast_lora", args.fast_lora)) if path]
    carried = [(flag, schedule.for_image_seq_len(image_seq_len)) for flag, schedule in read if schedule is not None]
    if len(carried) == 2 and not _same_timesteps(carried[0][1], carried[1][1]):
        raise GlanceError(f"--slow_lora and --fast_lora were trained for different schedules "
                          f"({_describe(carried[0][1])}; {_describe(carried[1][1])})")
    if args.schedule is None:
        return carried[0][1] if carried else GlanceSchedule.official(family.scheduler, image_seq_len)
    given = _parse_schedule(args.schedule, family, image_seq_len)
    if carried and not _same_timesteps(given, carried[0][1]):
        raise GlanceError(f"--schedule {args.schedule!r} is not the schedule {carried[0][0]} was trained for "
                          f"({_describe(carried[0][1])}): leave --schedule out to use the LoRAs' own")
    return given


def _guidance(args):
    """(true-CFG scale, negative prompt or None, FLUX guidance_scale or None for the pipeline's default): the flags
    if given, else the regime the LoRA files were trained for (`glance_jax.lora.read_guidance`), else no CFG. A flag
    that contradicts the files, a slow and a fast LoRA trained for different regimes, or a --guidance_scale outside
    the range a trained guidance embedding was trained for, are refused."""
    read = [(flag, read_guidance(path)) for flag, path in (("--slow_lora", args.slow_lora),
                                                           ("--fast_lora", args.fast_lora)) if path]
    read = [(flag, r) for flag, r in read if r is not None]
    carried = [(flag, (r["true_cfg_scale"], r["negative_prompt"])) for flag, r in read]
    if len(carried) == 2 and carried[0][1] != carried[1][1]:
        raise GlanceError(f"--slow_lora and --fast_lora were trained for different guidance "
                          f"({_describe_cfg(*carried[0][1])}; {_describe_cfg(*carried[1][1])})")
    if args.true_cfg_scale is not None:
        validation.positive_number("--true_cfg_scale", args.true_cfg_scale)
    scale = args.true_cfg_scale if args.true_cfg_scale is not None else carried[0][1][0] if carried else 1.0
    negative = args.negative_prompt if args.negative_prompt is not None else (
        carried[0][1][1] if carried and carried[0][1][1] is not None else " ")
    wanted = (float(scale), negative if scale > 1 else None)
    if carried and wanted != carried[0][1]:
        flags = " ".join(f"--{f} {getattr(args, f)!r}" for f in ("true_cfg_scale", "negative_prompt")
                         if getattr(args, f) is not None)
        raise GlanceError(f"{flags} is not the guidance {carried[0][0]} was trained for "
                          f"({_describe_cfg(*carried[0][1])}): leave the flag out to use the LoRAs' own")
    trained = [r["guidance_input"] for _, r in read if r.get("guidance_input")]
    guidance_scale = args.guidance_scale
    if trained:  # a guidance embedding trained beside the LoRAs (train: config.student.guidance_input)
        (low, high), default = trained[0]["range"], trained[0]["default"]
        guidance_scale = default if guidance_scale is None else guidance_scale
        if not low <= guidance_scale <= high:
            raise GlanceError(f"--guidance_scale {guidance_scale:g}: the LoRAs' guidance embedding was trained for "
                              f"scales {low:g} to {high:g}")
    return (*wanted, guidance_scale)


def _describe_cfg(scale, negative):
    return f"true CFG {scale:g} on {negative!r}, 2 passes a step" if scale > 1 else "no CFG, 1 pass a step"


def _describe_cost(passes, scale, negative):
    return f"{passes} transformer passes; {_describe_cfg(scale, negative)}"


def _sizes(args, factor):
    """(height, width, packed tokens) for a VAE of `factor` pixels a latent: by default 1024 x 1024 (an edit:
    its family's size for the last source image), and for the demo teacher (1 pixel a latent) its 8 x 8.
    Latents are packed 2 x 2 into tokens."""
    default = (8, 8) if factor == 1 else (1024, 1024)
    if getattr(args, "source_images", None):
        default = args.family.output_size(args.source_images[-1].height, args.source_images[-1].width)
    height, width = args.height or default[0], args.width or default[1]
    return height, width, (height // (2 * factor)) * (width // (2 * factor))


def _save_images(images, path):
    pixels = evaluation.to_uint8(images)
    safe_io.save_image(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), path,
                       validation.IMAGE_FORMATS[os.path.splitext(path)[1].lower()])


def _check_common(args):
    """The checks sample and eval share, run before anything is loaded; fills in a pipeline folder's parts.

    `--model` may be a diffusers pipeline folder (model_index.json): its transformer, its vae (unless
    --vae), its text encoders (unless --text_encoders or --embeddings) and its scheduler config (unless
    --scheduler) are used. Returns the Glance schedule: from --schedule or the LoRA files, checked against
    each other; None with --steps.
    """
    args.family = None
    if args.model:
        args.model = families.local_model_path(args.model, "--model", None, args.vae,
                                               args.text_encoders or args.embeddings)
        args.family = families.of_pipeline(args.model)
        parts = checkpoints.pipeline_parts(args.model) or {}
        text_encoders = args.text_encoders or (None if args.embeddings else args.model if parts else None)
        args.model, args.vae, args.text_encoders = families.model_paths(args.model, None, args.vae, text_encoders,
                                                                        what="--model")
        scheduler = os.path.join(parts.get("scheduler", ""), "scheduler_config.json")
        if not args.scheduler and parts.get("scheduler") and os.path.isfile(scheduler):
            args.scheduler = scheduler
    elif args.vae:
        args.vae = families.vae_path(args.vae, what="--vae")
    if args.scheduler and os.path.isfile(args.scheduler):
        validation.scheduler_file(args.scheduler)
    if args.text_encoders:
        safe_io.no_remote_code(args.text_encoders)  # tokenizers load with trust_remote_code=False
    config = checkpoints.open_checkpoint(args.model or teacher.TEACHER_DIR, families.CLASSES).config  # headers only
    family = args.family = args.family or families.of_class_name(checkpoints.class_name(config))
    factor = teacher.VAE[0].spatial_scale if not args.model else family.vae_scale_factor
    _check_source_images(args, family)
    for flag in ("scheduler", "embeddings", "slow_lora", "fast_lora"):
        path = getattr(args, flag)
        if path and not os.path.exists(os.path.expanduser(path)):
            raise GlanceError(f"--{flag} {path}: no such file or folder")
    for flag in ("height", "width"):
        if getattr(args, flag) is not None:
            validation.multiple_of(f"--{flag}", getattr(args, flag), 2 * factor)
    validation.image_size(*_sizes(args, factor)[:2], validation.positive_int("--max_pixels", args.max_pixels))
    if args.schedule not in (None, "official"):
        _schedule_steps(args.schedule)
    if getattr(args, "steps", None):
        return None
    return _glance_schedule(args, family, _sizes(args, factor)[2])


def _check_source_images(args, family):
    """--image: the source images of an editing model (read now: their sizes give the output's), as many as it
    takes; refused for a text-to-image model, or without the VAE that encodes them."""
    if not hasattr(args, "image") and family.reference_images:
        raise GlanceError(f"glance-jax eval compares text-to-image samples; {family.name} is an editing model")
    images = getattr(args, "image", None) or []
    if family.reference_images and not images:
        raise GlanceError(f"--model is {family.name}, an editing model: pass the source image with --image")
    if images and not family.reference_images:
        raise GlanceError(f"--image: {family.name} is no editing model (a pipeline folder of FLUX.1 Kontext or "
                          "Qwen-Image-Edit edits)")
    if len(images) > family.reference_images:
        raise GlanceError(f"--image given {len(images)} times: {family.name} takes at most "
                          f"{family.reference_images} source image(s)")
    if images and not args.vae:
        raise GlanceError("--image needs the model's VAE to encode it: pass --vae (or a pipeline folder as --model)")
    args.source_images = [data.read_image(path) for path in images]


def _schedule_steps(text):
    """(slow, fast) 1-based step indices from --schedule 'slow|fast', e.g. '1,5,9|16,31,46'."""
    try:
        slow, fast = ([int(s) for s in part.split(",")] for part in text.split("|"))
    except ValueError:
        raise GlanceError(f"--schedule {text!r}: use 'official' or slow|fast step indices such as "
                          "'1,5,9|16,31,46'") from None
    if not slow or not fast or min(slow + fast) < 1:
        raise GlanceError(f"--schedule {text!r}: steps are 1-based indices of the 50-step schedule")
    return slow, fast


def _common_flags(p):
    p.add_argument("--model", default=None, help="pipeline folder (model_index.json), model folder or file "
                   "(default: the demo's teacher)")
    p.add_argument("--scheduler", default=None, help="diffusers scheduler_config.json (default: the model's)")
    p.add_argument("--embeddings", default=None, help=EMBEDDINGS_HELP + " (default: the demo's)")
    p.add_argument("--vae", default=None, help="VAE folder of a latent model: PNG output and pixel metrics")
    p.add_argument("--text_encoders", default=None,
                   help="pipeline folder with the text encoder(s) and tokenizer(s): any prompt, no embeddings file")
    p.add_argument("--slow_lora", default=None, help="Slow-LoRA file (any layout load_lora reads)")
    p.add_argument("--fast_lora", default=None, help="Fast-LoRA file")
    p.add_argument("--schedule", default=None,
                   help="'official' or slow|fast steps, e.g. '1,5,9|16,31,46' (default: the schedule the LoRA files "
                        "were trained for, else 'official')")
    p.add_argument("--integration", default="consistent", choices=["consistent", "official"])
    p.add_argument("--true_cfg_scale", type=float, default=None,
                   help="true CFG (two passes a step) at this scale; default: the regime the LoRA files were trained "
                        "for, else none")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="FLUX.1-dev's guidance input, or that of LoRAs trained with a guidance embedding (default: "
                        "theirs, else 3.5)")
    p.add_argument("--negative_prompt", default=None, help="true CFG's negative prompt (default: the LoRA files', "
                   "else ' ')")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--max_pixels", type=int, default=validation.MAX_PIXELS,
                   help="largest height x width sampled (default: 4096 x 4096); larger sizes are refused first")


def sample_main(argv):
    p = validation.ArgumentParser(prog="glance-jax sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""example:
  glance-jax sample --prompt "the numeral three, written by hand" --out three.png
  glance-jax sample --model ~/flux-dev-bf16 --embeddings prompts.safetensors --prompt "a red fox" \\
      --slow_lora runs/flux/slow_lora.safetensors --fast_lora runs/flux/fast_lora.safetensors --out fox.safetensors""")
    p.add_argument("--prompt", required=True, help="a caption of the embeddings file")
    p.add_argument("--out", required=True, help="output image (.png, .jpg, .webp; latent models need a VAE) or "
                   ".safetensors (the latents)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="plain sampling with this many steps instead of Glance")
    p.add_argument("--image", action="append", default=None,
                   help="source image of an editing model (FLUX.1 Kontext, Qwen-Image-Edit); repeat it for several "
                        "(Qwen-Image-Edit-2509 takes up to 3)")
    _common_flags(p)
    args = p.parse_args(argv)
    validation.seed("--seed", args.seed)
    image_out = validation.out_extension(args.out, [*validation.IMAGE_FORMATS, ".safetensors"]) != ".safetensors"
    validation.output_file(args.out, args.overwrite, "--out")
    if args.steps is not None:
        validation.positive_int("--steps", args.steps)
        if args.slow_lora or args.fast_lora:
            raise GlanceError("--steps samples the plain base, without LoRAs; Glance LoRAs need the Glance schedule: "
                              "leave out --steps, or the LoRA files")
    schedule = _check_common(args)
    cfg_scale, negative, guidance_scale = _guidance(args)
    if image_out and not args.vae and args.model:
        raise GlanceError("image output of a latent model needs its VAE: pass --vae (or a pipeline folder as "
                          "--model), or use --out x.safetensors")
    pipe, family = _pipeline(args.model, args.scheduler, args.vae, args.family)
    height, width, _ = _sizes(args, pipe.vae_scale_factor)
    sources = args.source_images
    prompts = _embeddings(args.embeddings, [args.prompt], args.text_encoders, family, sources)
    negatives = None if negative is None else _embeddings(args.embeddings, [negative], args.text_encoders, family,
                                                          sources)
    kw = dict(num_inference_steps=args.steps) if args.steps else dict(integration=args.integration,
                                                                       schedule=schedule)
    if sources:
        kw["image"] = sources
    if not args.steps:
        kw["slow_lora"] = load_lora(args.slow_lora, pipe.params) if args.slow_lora else None
        kw["fast_lora"] = load_lora(args.fast_lora, pipe.params) if args.fast_lora else None
    latents = pipe.sample(prompts, negatives, height=height, width=width, seed=args.seed, true_cfg_scale=cfg_scale,
                          guidance_scale=guidance_scale, **kw)
    if image_out:
        _save_images(_images(pipe, latents, height, width)[0], args.out)
    else:
        unpacked = np.asarray(family.unpack_latents(latents, height, width, pipe.vae_scale_factor))
        safetensors_io.save_file({"latents": unpacked[0]}, args.out, {"prompt": args.prompt, "seed": args.seed})
    print(f"wrote {args.out} ({_describe_cost(pipe.last_nfe, cfg_scale, negative)})")


def _images(pipe, latents, height, width):
    """Images (B, H, W, C) in [-1, 1] from packed latents, through the pipeline's VAE (tiled)."""
    unpacked = pipe.family.unpack_latents(latents, height, width, pipe.vae_scale_factor)
    return np.clip(np.asarray(decode_latents(*pipe.vae, unpacked, tiled=True)), -1, 1)


def eval_main(argv):
    p = validation.ArgumentParser(prog="glance-jax eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""example:
  glance-jax eval --prompts prompts.txt --seeds 0,1,2 --workdir eval_out
  glance-jax eval --model ~/flux-dev-bf16 --embeddings embeds.safetensors --prompts prompts.txt \\
      --slow_lora slow_lora.safetensors --fast_lora fast_lora.safetensors --base_steps 50""")
    p.add_argument("--prompts", required=True, help="text file, one caption of the embeddings file per line")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every prompt is sampled with each")
    p.add_argument("--base_steps", type=int, default=50, help="steps of the base's reference sampling")
    p.add_argument("--workdir", default="glance_eval", help="where eval.json and grid.png go")
    _common_flags(p)
    args = p.parse_args(argv)
    captions, seeds = _eval_inputs(args)
    schedule = _check_common(args)
    cfg_scale, negative, guidance_scale = _guidance(args)
    pipe, family = _pipeline(args.model, args.scheduler, args.vae, args.family)
    height, width, _ = _sizes(args, pipe.vae_scale_factor)
    batch_captions = [c for c in captions for _ in seeds]
    encode = lambda texts: {k: jnp.asarray(v) for k, v in _embeddings(args.embeddings, texts, args.text_encoders,
                                                                         family).items()}
    prompts = encode(batch_captions)
    negatives = None if negative is None else encode([negative] * len(batch_captions))
    batch_seeds = [s for _ in captions for s in seeds]
    glance = dict(integration=args.integration, schedule=schedule,
                  slow_lora=load_lora(args.slow_lora, pipe.params) if args.slow_lora else None,
                  fast_lora=load_lora(args.fast_lora, pipe.params) if args.fast_lora else None)
    # every run samples with the same guidance (the base too); names count steps, NFE counts passes
    cfg = "cfg-" if negative is not None else ""
    reference = f"base-{cfg}{args.base_steps}"
    steps = schedule.num_steps
    # the reference, the Glance run, and the base at the Glance run's cost and twice it (same noise)
    runs = [(reference, "base", dict(num_inference_steps=args.base_steps)), (f"glance-{cfg}{steps}", "glance", glance)]
    runs += [(f"base-{cfg}{n}", "base", dict(num_inference_steps=n))
             for n in sorted({steps, 2 * steps}) if n < args.base_steps]
    sample = lambda kw: pipe.sample(prompts, negatives, height=height, width=width, seed=batch_seeds,
                                    true_cfg_scale=cfg_scale, guidance_scale=guidance_scale, **kw)
    rows, outputs = _eval_runs(pipe, runs, sample, reference, height, width)
    os.makedirs(args.workdir, exist_ok=True)
    safe_io.write_json(os.path.join(args.workdir, "eval.json"), {
        "runs": rows, "prompts": captions, "seeds": seeds, "schedule": schedule.to_dict(),
        "true_cfg_scale": cfg_scale, "negative_prompt": negative,
        "space": "pixels" if pipe.vae is not None else "latents (pass --vae for pixels)"}, indent=2)
    _print_eval(rows, reference)
    if pipe.vae is not None:
        grid = evaluation.grid([list(outputs[r["name"]]) for r in rows], [r["name"] for r in rows],
                               [f"{i // len(seeds)}:{s}" for i, s in enumerate(batch_seeds)], scale=5)
        safe_io.save_image(grid, os.path.join(args.workdir, "grid.png"), "PNG")
        print(f"wrote {args.workdir}/eval.json and {args.workdir}/grid.png")
    else:
        print(f"wrote {args.workdir}/eval.json (agreement in latent space; --vae gives pixels and a grid)")


def _eval_inputs(args):
    """(captions, seeds) of `eval`, checked before anything loads; the workdir's outputs checked too."""
    validation.positive_int("--base_steps", args.base_steps)
    args.workdir = validation.output_folder(args.workdir)
    validation.fresh_outputs(args.workdir, ("eval.json", "grid.png"), args.overwrite)
    if not os.path.isfile(args.prompts):
        raise GlanceError(f"{args.prompts}: no such prompt file")
    captions = [line.strip() for line in validation.read_text(args.prompts, "prompt file").splitlines()
                if line.strip()]
    if not captions:
        raise GlanceError(f"{args.prompts}: no prompts in it")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise GlanceError(f"--seeds {args.seeds!r}: use comma-separated integers") from None
    for s in seeds:
        validation.seed("--seeds", s)
    return captions, seeds


def _eval_runs(pipe, runs, sample, reference, height, width):
    """(one row of figures per run, {run: images or latents}): each run timed on its second call, compared with
    the reference run (the first) in pixels where the pipeline has a VAE, else in latent space."""
    pixels = pipe.vae is not None
    rows, outputs = [], {}
    for name, kind, kw in runs:
        sample(kw).block_until_ready()
        start = time.perf_counter()
        latents = sample(kw).block_until_ready()
        seconds = time.perf_counter() - start
        out = _images(pipe, latents, height, width) if pixels else np.asarray(
            pipe.family.unpack_latents(latents, height, width, pipe.vae_scale_factor))
        outputs[name] = out
        ref = outputs[reference]
        mse = evaluation.mse(out, ref)
        rows.append({"name": name, "kind": kind, "nfe": pipe.last_nfe, "reference": reference,
                     "sec_per_image": seconds / len(out),
                     "psnr_vs_base": evaluation.psnr(out, ref) if pixels else None,
                     "ssim_vs_base": evaluation.ssim(out, ref) if pixels else None,
                     "mse_vs_base": mse,
                     # agreement on one scale for pixels and latents: PSNR, or -10 log10(MSE) for latents
                     "agreement_db": evaluation.psnr(out, ref) if pixels else -10 * np.log10(max(mse, 1e-20))})
    base_rows = [r for r in rows if r["kind"] == "base" and r["name"] != reference]
    glance_row = rows[1]
    if len(base_rows) >= 2:
        try:
            glance_row["equivalent_base_nfe"], glance_row["speedup"], glance_row["extrapolated"] = evaluation.speedup(
                [r["nfe"] for r in base_rows], [r["agreement_db"] for r in base_rows], glance_row["agreement_db"],
                glance_row["nfe"])
        except ValueError:  # the base did not improve from N to 2N steps: no curve to read a cost from
            pass
    return rows, outputs


def _print_eval(rows, reference):
    print(f"{'run':<14}{'NFE':>5}{'s/img':>9}{'PSNR':>8}{'SSIM':>8}{'MSE':>10}")
    for r in rows:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"{r['name']:<14}{r['nfe']:>5}{r['sec_per_image']:>9.4f}{fmt(r['psnr_vs_base'], '>8.2f')}"
              f"{fmt(r['ssim_vs_base'], '>8.3f')}{r['mse_vs_base']:>10.5f}")
    glance_row = rows[1]
    if "speedup" in glance_row:
        base_rows = [r for r in rows if r["kind"] == "base" and r["name"] != reference]
        print(f"{glance_row['name']}: the base needs {glance_row['equivalent_base_nfe']:.1f} evaluations for the same "
              f"agreement with {reference} ({'extrapolated beyond ' if glance_row['extrapolated'] else ''}"
              f"{', '.join(r['name'] for r in base_rows)}): {glance_row['speedup']:.2f}x fewer with Glance")
