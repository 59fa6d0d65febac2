"""The official Glance training recipes as ml_collections configs; the files in configs/ start from these."""

import ml_collections

from glance_jax import families
from glance_jax.schedules import OFFICIAL_FAST_STEPS, OFFICIAL_SLOW_STEPS


def official(family, phase):
    """The official recipe for `family` ("flux" or "qwen-image") and `phase` ("slow", "fast" or "both")."""
    recipe = families.get(family).recipe
    rank, lr, caption_dropout = recipe.rank, recipe.lr, recipe.caption_dropout
    c = ml_collections.ConfigDict()
    c.family = family
    c.phase = phase
    c.seed = 0
    c.steps = 60
    c.batch_size = 1
    c.target = "data"  # "data": the sample's straight-line velocity (the paper); "teacher": the base's trajectory

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # any checkpoint glance-jax loads: diffusers folder, BFL file, converted folder
    c.model.vae_path = ""  # the VAE folder (e.g. FLUX.1-dev/vae): encodes the image; empty: latents precomputed
    c.model.text_encoder_path = ""  # the pipeline folder with text_encoder(s) and tokenizer(s); empty: precomputed
    c.model.dtype = "bf16"  # the frozen base; LoRA and optimizer state are always fp32
    # "fp8" or "int8": 8-bit Dense kernels, one scale per output channel (glance_jax/quantize.py); "none": a base
    # in model.dtype. The official code trains on an optimum-quanto qfloat8 (fp8) transformer, and so do the
    # official configs in configs/ (flux_*.py, qwen_image_*.py); "none" here keeps small fp32 runs exact.
    c.model.quantize = "none"
    c.model.remat_policy = "none"  # "none", "full", "dots", "dots_saveable"
    c.model.guidance = 1.0  # FLUX.1-dev's guidance input during training, as the official code passes it

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # images with same-name .txt captions
    c.data.resolution = 1024  # long side in pixels
    c.data.multiple = 32  # crop to a multiple of this many pixels
    c.data.vae_scale_factor = 8  # pixels per latent (1 for models without a VAE, such as the demo's)
    c.data.caption_dropout = caption_dropout  # probability of training on the empty prompt " "
    c.data.cache_dir = ""  # encoded latents/embeddings; default ~/.cache/glance_jax

    c.lora = ml_collections.ConfigDict()
    c.lora.targets = family  # a preset (glance_jax.families.lora_preset), or a comma-separated list of module names
    c.lora.rank = rank
    c.lora.alpha = 4.0 * rank

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = lr
    c.optim.warmup_steps = 10  # linear from 0, then constant (diffusers' constant_with_warmup)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.state_dtype = "fp32"  # Adam's moments; "bf16" halves them (the official Qwen-Image config: 8-bit Adam)

    c.schedule = ml_collections.ConfigDict()
    # "steps": slow_steps / fast_steps, 1-based steps of the base_steps-step schedule at the sample's size (the
    # paper); "uniform": the base's own (num_slow + num_fast)-step schedule, first num_slow steps slow;
    # "fitted": num_slow + num_fast points of the teacher.substeps grid fitted to the teacher's trajectories
    c.schedule.kind = "steps"
    c.schedule.num_slow, c.schedule.num_fast = 5, 5  # for "uniform" and "fitted"
    c.schedule.split = "half"  # "fitted": slow/fast boundary halfway, or an SNR threshold (a number as a string)
    c.schedule.slow_steps = OFFICIAL_SLOW_STEPS
    c.schedule.fast_steps = OFFICIAL_FAST_STEPS
    c.schedule.base_steps = 50
    c.schedule.round_bf16 = False  # True: timesteps rounded to bf16, as the official code stores them

    c.teacher = ml_collections.ConfigDict()  # only for target="teacher"
    c.teacher.trajectories = 4  # noise seeds whose teacher trajectories are integrated once, then reused
    c.teacher.substeps = 50  # the base integrates on this fine grid (plus the Glance points)
    c.teacher.batch = 8  # noises integrated per compiled call
    c.teacher.guidance_scale = 1.0  # > 1: guided trajectories (true CFG; FLUX.1-dev: its guidance input)
    c.teacher.negative_prompt = " "  # CFG's negative: the sample's empty-prompt encoding
    # more captions (no images) whose trajectories join the caption's: a guided student then learns guidance for
    # more than one prompt; trajectory k is drawn with caption k mod (1 + len(prompts))
    c.teacher.prompts = ()
    c.teacher.minibatch = 1  # (trajectory, point) draws averaged in one step; > 1 for guided trajectories

    c.mesh = ""  # device mesh, e.g. "data=2,fsdp=4" (axes data, fsdp, tensor); empty: one device

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 20
    c.checkpoint.keep = 3
    return c


def teacher_recipe(family, phase):
    """The teacher-target recipe: what the demo's controlled study found works (README, "The demo").

    LoRA on every Dense layer of the blocks (the "<family>-all" preset), lr 1e-4, 600 steps a phase, 64
    cached teacher trajectories, 10 points of the 50-step grid fitted to them (5 slow + 5 fast), guided
    trajectories (the student then needs one pass a step). Cost of the trajectories: 64 x 50 forward
    passes of the base (x2 for Qwen-Image's true CFG), once per sample and grid; both phases and reruns
    reuse them.
    """
    c = official(family, phase)
    c.target = "teacher"  # the base's own trajectory: the data target copies the one image (README)
    c.lora.targets = f"{family}-all"  # every Dense layer inside the blocks; the four attention layers are too few
    c.optim.lr = 1e-4  # higher rates are worse: each step is a one-sample estimate
    c.steps = 600  # gains stop at about 1000 steps
    c.schedule.kind = "fitted"  # fitted beat uniform, which beat the paper's split (half its steps near sigma 1)
    c.schedule.num_slow, c.schedule.num_fast = 5, 5
    c.teacher.trajectories = 64  # 8 -> 64 trajectories was the largest single gain
    c.teacher.batch = 4  # noises per compiled call (activation memory at 1024 x 1024)
    c.teacher.guidance_scale = families.get(family).teacher_guidance  # as the base samples (families.py)
    if families.get(family).guidance_input:  # FLUX.1-dev: a guidance input, one pass a step
        c.model.guidance = c.teacher.guidance_scale  # the student learns at the guidance it will sample with
    c.data.caption_dropout = 0.0  # the student learns the guided trajectory of its caption only
    return c
