"""Phased Slow-Fast samplers: the whole trajectory as one compiled program.

A trajectory is a list of phases; each phase is a LoRA (or none) and a run of
Euler steps `x <- x + (sigma_next - sigma) v(x, t)`, given as two arrays
(the model's timestep t and the step size). Inside one jit-compiled function
each phase merges its LoRA into the (donated) base weights, loops over its
steps, and takes the LoRA out again, so sampling costs what the base costs and
no second copy of the base exists. The arrays come from the schedule on the
host, padded to a multiple of 64 steps, and each phase loops over its own
count: changing prompts, seeds, LoRA values, the integration mode or the
step counts (up to 64 a phase) never recompiles; changing the resolution,
the LoRAs' layers or guidance on/off does, once.

Integration modes (the official Glance code samples the second way; README, "Sampling"):
- "consistent" (default): one schedule, the slow then the fast timesteps;
  each step goes from sigma_i = t_i / 1000 to the next sigma (the last to 0),
  the model conditioned on sigma_i.
- "official": the official Glance pipelines step for step: the slow phase is
  told the slow timesteps but steps along the first sigmas of the 50-step
  schedule; the fast phase restarts on a fresh schedule with as many steps as
  it has timesteps, treating the latents as if at sigma 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glance_jax import families, sharding, validation
from glance_jax.errors import GlanceError
from glance_jax.lora import check_shapes, check_values, merged_params
from glance_jax.lora_tree import guidance_embedder, guidance_embedder_alone
from glance_jax.modules.tiling import tiled_decode
from glance_jax.quantize import is_quantized, kind_of, quantize_params
from glance_jax.schedules import FlowMatchEulerScheduler, GlanceSchedule

INTEGRATIONS = ("consistent", "official")


# ---- VAE latents to images ----

def decode_latents(vae, vae_params, latents, tiled=False):
    """Images (B, H, W, 3) in [-1, 1] from transformer latents (B, h, w, C) of either model's VAE."""
    z = vae.add_frames(vae.denormalize(jnp.asarray(latents, jnp.float32)))
    images = tiled_decode(vae, vae_params, z) if tiled else vae.apply({"params": vae_params}, z, method="decode")
    return vae.drop_frames(images)


def encode_images(vae, vae_params, images):
    """The latents (B, h, w, C) the transformer works on, of images (B, H, W, 3) in [-1, 1], by either model's
    VAE: its posterior mean (diffusers' `sample_mode="argmax"`), shifted and scaled."""
    encode = vae.apply({"params": vae_params}, vae.add_frames(jnp.asarray(images, jnp.float32)), method="encode")[0]
    return vae.normalize(vae.drop_frames(encode))


def _pil(image):
    """A source image (PIL, or (H, W, 3) uint8 or floats in [0, 1]) as an RGB PIL image."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise GlanceError(f"a source image of shape {array.shape}: (height, width, 3) needed")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def image_pixels(image, height, width):
    """An RGB PIL image resized to `height` x `width` as diffusers' VaeImageProcessor resizes (Lanczos), as
    (height, width, 3) float32 in [-1, 1]."""
    from PIL import Image
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, np.float32) / 127.5 - 1.0


# ---- the schedule as per-phase step arrays ----

def phase_steps(scheduler_config, image_seq_len, schedule=None, num_inference_steps=None, integration="consistent"):
    """[(timesteps, step sizes)] per phase, as float32 arrays: one phase for a plain schedule, two for Glance."""
    if integration not in INTEGRATIONS:
        raise GlanceError(f"unknown integration {integration!r}: use one of {', '.join(INTEGRATIONS)}")
    scheduler = FlowMatchEulerScheduler.from_config(scheduler_config)
    if schedule is not None and num_inference_steps is not None:
        raise GlanceError("pass num_inference_steps (plain sampling) or schedule=GlanceSchedule(...), not both")
    if schedule is None:
        if not num_inference_steps:
            raise GlanceError("pass num_inference_steps or schedule=GlanceSchedule(...)")
        timesteps, sigmas = scheduler.set_timesteps(num_inference_steps, image_seq_len)
        return [(timesteps, np.diff(sigmas))]
    if not isinstance(schedule, GlanceSchedule):
        raise GlanceError("schedule must be a GlanceSchedule")
    schedule = schedule.for_image_seq_len(image_seq_len)
    slow, fast = np.float32(schedule.slow), np.float32(schedule.fast)
    if integration == "consistent":
        steps = np.diff(schedule.sigmas())
        return [(slow, steps[:len(slow)]), (fast, steps[len(slow):])]
    _, base_sigmas = scheduler.set_timesteps(schedule.base_steps, image_seq_len)
    _, fast_sigmas = scheduler.set_timesteps(len(fast), image_seq_len)
    return [(slow, np.diff(base_sigmas)[:len(slow)]), (fast, np.diff(fast_sigmas))]


# ---- the compiled sampler ----

def guided_velocity(cond, neg, cfg_scale, rescale):
    """True classifier-free guidance `neg + s (cond - neg)` of two velocities (B, tokens, C).

    With `rescale` (diffusers' QwenImagePipeline) the result is then scaled per token to the norm of
    the conditional velocity: `comb * ||cond|| / ||comb||` (norms over channels). diffusers' FluxPipeline
    (`true_cfg_scale`) does not rescale.
    """
    comb = neg + cfg_scale * (cond - neg)
    if not rescale:
        return comb
    return comb * (jnp.linalg.norm(cond, axis=-1, keepdims=True) / jnp.linalg.norm(comb, axis=-1, keepdims=True))


def velocity(model, static, variables, x, t, conds, cfg_scale, rescale):
    """The model's velocity; with two conditionings (prompt, negative prompt), true CFG (two passes)."""
    outs = [model.apply(variables, hidden_states=x, timestep=t, **dict(static), **c).astype(jnp.float32)
            for c in conds]
    if len(outs) == 1:
        return outs[0]
    return guided_velocity(*outs, cfg_scale, rescale)


def euler_step(model, static, variables, x, sigma, dt, conds, cfg_scale=1.0, cfg_rescale=False):
    """One Euler step `x + dt v(x, sigma)` (in float32, returned in x's dtype): the sampler's step, and the one
    the trainer integrates its teacher trajectories with. Two conditionings: true CFG (two passes)."""
    v = velocity(model, static, variables, x.astype(model.dtype), jnp.full((x.shape[0],), sigma), conds, cfg_scale,
                  cfg_rescale)
    return (x.astype(jnp.float32) + dt * v).astype(x.dtype)


def transformer_passes(schedule=None, num_inference_steps=None, guided=False):
    """Transformer evaluations per image for a schedule (or a plain step count): a true-CFG step costs 2."""
    steps = schedule.num_steps if schedule is not None else num_inference_steps
    if not steps:
        raise GlanceError("pass num_inference_steps or schedule=GlanceSchedule(...)")
    return int(steps) * (2 if guided else 1)


def _sample(model, lora_mode, static, cfg_rescale, params, loras, phases, latents, conds, cfg_scale, lora_scale):
    """Runs every phase; returns (latents, params with every LoRA taken out again).

    `static` holds hashable model arguments that shape the program (Qwen-Image's img_shapes);
    `cfg_rescale` says whether true CFG rescales to the conditional norm (Qwen-Image) or not (FLUX).
    """
    for lora, (timesteps, step_sizes, count) in zip(loras, phases):
        merge = lora is not None and lora_mode == "merge"
        if merge:
            params = merged_params(params, lora, lora_scale)
        variables = {"params": params}
        if lora is not None and lora_mode == "unmerged":
            variables["lora"] = jax.tree_util.tree_map_with_path(
                lambda path, x: x * lora_scale if path[-1].key == "alpha" else x, lora)
        elif merge and guidance_embedder(lora) is not None:  # a trained guidance input is not merged: it is a layer
            variables["lora"] = guidance_embedder_alone(lora)

        def step(i, x, variables=variables, timesteps=timesteps, step_sizes=step_sizes):
            return euler_step(model, static, variables, x, timesteps[i] / 1000, step_sizes[i], conds, cfg_scale,
                              cfg_rescale)

        latents = jax.lax.fori_loop(0, count, step, latents)  # `count` is traced: a while loop
        if merge:
            params = merged_params(params, lora, -lora_scale)
    return latents, params


def _padded(steps, multiple=64):
    """A phase's step array padded with zeros to a multiple of 64 entries: the sampler loops over the first
    len(steps) only, so every schedule of up to 64 steps a phase shares one compiled program."""
    return np.pad(np.asarray(steps, np.float32), (0, -len(steps) % multiple))


_sample_plain = jax.jit(_sample, static_argnums=(0, 1, 2, 3))
_sample_donating = jax.jit(_sample, static_argnums=(0, 1, 2, 3), donate_argnums=4)


def compile_count():
    """How many sampler programs have been compiled in this process (both variants); tests use it to
    check that prompts, seeds, LoRA values and integration modes never recompile."""
    return _sample_plain._cache_size() + _sample_donating._cache_size()


def _check_lora(tree, name):
    if tree is not None and not isinstance(tree, dict):
        raise GlanceError(f"{name} must be a LoRA tree (from glance_jax.lora.load_lora or init_lora)")


class GlancePipeline:
    """The Slow-Fast sampler of any model family: noise, schedule, phases, LoRAs, the compiled sampler.

    `sample(encodings, negative, ...)` takes prompt encodings under diffusers' names (as every family's prompt
    encoder returns them); `FluxGlancePipeline` and `QwenImageGlancePipeline` are thin entry points with
    diffusers' FluxPipeline / QwenImagePipeline signatures over it.

    The pipeline owns `params`: a call with LoRAs merges them into the
    weights in place (and takes them out again), so keep using
    `pipeline.params`, not an older reference.

    `lora_mode="merge"` (default for a float base) adds each LoRA into the weights in place
    before its phase and subtracts it after, so every step costs what the
    base costs; like PEFT's merge/unmerge, the subtraction restores the base
    to rounding (an element can move by one ulp when the LoRA pushes it across
    a power of two). `lora_mode="unmerged"` applies the LoRAs beside the
    weights instead (about 1-2% more FLOPs at rank 16-32): the base is never
    modified and repeated calls agree bit for bit; it is the default, and the only
    mode, for a quantized base (`quantize=`, glance_jax.quantize).

    After each call `last_nfe` holds the transformer evaluations spent per image (steps x passes: a
    true-CFG step is two passes), so that cost comparisons count what was actually run.
    """

    family = None  # the model family (glance_jax.families) an entry point samples; else the model's
    last_nfe = None

    def __init__(self, model, params, scheduler_config, latent_channels=None, vae_scale_factor=None, vae=None,
                 tiled_vae=False, mesh=None, prompt_encoder=None, quantize=None, family=None):
        """`latent_channels` and `vae_scale_factor` describe the latents: by default the model's and the VAE's
        (its family's VAE without one: FLUX.1 and Qwen-Image, 16 and 8).

        `vae=(vae_model, vae_params)` enables `output_type="np"` and `"pil"`; `tiled_vae=True` decodes in
        tiles (diffusers' tiling), so large images fit in less memory. With a `mesh` (and params loaded
        onto it, `from_pretrained(..., mesh=mesh)`), prompts are spread over its `data` axis. A
        `prompt_encoder` (the family's) lets calls pass `prompt=` strings instead of embeddings.
        `quantize="fp8"` or `"int8"` quantizes float `params` kernel by kernel, donating each float kernel
        (loading with `from_pretrained(..., quantize=...)` is cheaper: the float base never exists). `family`:
        the model's (glance_jax.families) by default; an editing family shares its transformer class with a
        text-to-image one (FLUX.1 Kontext: FLUX.1's), so name it (or use its entry point).
        """
        self.family = families.get(family) if family else self.family or families.of(model)
        self.mesh, self.prompt_encoder = mesh, prompt_encoder
        self.model, self.params = model, quantize_params(params, quantize)
        self.scheduler_config = dict(scheduler_config)
        self.latent_channels = latent_channels or self.family.latent_channels(model)
        self.vae_scale_factor = vae_scale_factor or (vae[0].spatial_scale if vae else self.family.vae_scale_factor)
        self.vae, self.tiled_vae = vae, tiled_vae
        FlowMatchEulerScheduler.from_config(self.scheduler_config)  # refuse unsupported configs now

    def sample(self, encodings, negative=None, prompt=None, negative_prompt=None, latents=None, height=None,
               width=None, num_inference_steps=None, schedule=None, guidance_scale=None, true_cfg_scale=1.0,
               slow_lora=None, fast_lora=None, lora_scale=1.0, integration="consistent", seed=0,
               output_type="latent", lora_mode=None, image=None, image_size=None):
        """Samples packed latents (B, tokens, D) (or images, by `output_type`) for prompt `encodings`.

        `encodings` / `negative`: dicts of arrays under diffusers' names (`prompt_embeds`,
        `pooled_prompt_embeds`, `prompt_embeds_mask`), or `prompt` / `negative_prompt` strings through the
        pipeline's prompt encoder. `seed` is an int or one int per prompt; `latents` (packed) overrides the
        noise. With `schedule=GlanceSchedule(...)`, `slow_lora` and `fast_lora` adapt the two phases; with
        `num_inference_steps` alone the base samples on the plain schedule. `guidance_scale` feeds a
        guidance-distilled model's guidance input (FLUX.1-dev; default the family's), or the guidance
        embedding that LoRAs trained with one carry (glance_jax.lora_tree.GUIDANCE_EMBEDDER). True CFG: with
        a negative prompt and `true_cfg_scale > 1`, each step runs two passes and combines them as
        `neg + true_cfg_scale * (cond - neg)` (with the family's norm rescale).

        Editing families (`family.reference_images`) take the source `image` (one, or a list of up to that
        many, PIL or (H, W, 3) in [0, 1], shared by every prompt): each is resized to `image_size` ((height,
        width); default the family's size for it, `family.reference_size`), VAE-encoded and appended to the
        image tokens of both conditionings; a prompt encoder that sees images gets them too. Their latents may
        come in `encodings["image_latents"]` instead (a tuple of (B, h, w, C), a row per prompt). `height` and
        `width` default to 1024, or for an edit to `family.output_size` of the last source image.
        """
        given = encodings is not None and "image_latents" in encodings  # source latents, one row per prompt
        images = self._source_images(image, given)
        if images and (height is None or width is None):
            height, width = self.family.output_size(images[-1].height, images[-1].width)
        height, width = 1024 if height is None else height, 1024 if width is None else width
        if prompt is not None:
            encodings = self._encode(prompt, images)
        batch = encodings["prompt_embeds"].shape[0]
        if negative_prompt is not None:
            negative = self._encode([negative_prompt] * batch if isinstance(negative_prompt, str) else
                                    negative_prompt, images)
        negative = {k: v for k, v in (negative or {}).items() if v is not None} or None
        if images:
            encodings = {**encodings, "image_latents": self.image_latents(images, image_size, batch)}
        if "image_latents" in encodings:  # both passes of true CFG see the sources
            negative = negative and {**negative, "image_latents": encodings["image_latents"]}
        if guidance_scale is None:
            guidance_scale = self.family.default_guidance_scale
        numbers = {"true_cfg_scale": true_cfg_scale, "lora_scale": lora_scale}
        if guidance_scale is not None:
            numbers["guidance_scale"] = guidance_scale
        arrays = {**encodings, "latents": latents, **{"negative_" + k: v for k, v in (negative or {}).items()}}
        for key in ("image_latents", "negative_image_latents"):
            arrays.update({f"{key}[{i}]": r for i, r in enumerate(arrays.pop(key, ()))})
        validation.pipeline_inputs(batch, arrays, numbers)
        rows, cols = self.family.latent_grid(height, width, self.vae_scale_factor)
        trained_input = not self.family.takes_guidance(self.model) and any(
            tree is not None and guidance_embedder(tree) is not None for tree in (slow_lora, fast_lora))

        def cond(encoded):
            c, static = self.family.conditioning(self.model, encoded, rows, cols, guidance_scale)
            if trained_input:  # LoRAs trained with a guidance input (train: config.student.guidance_input)
                c["guidance"] = jnp.full((encoded["prompt_embeds"].shape[0],), guidance_scale, jnp.float32)
            return c, static
        first, static = cond(encodings)
        conds = [first] + ([cond(negative)[0]] if negative is not None and true_cfg_scale > 1 else [])
        return self._run(batch, latents, height, width, schedule, num_inference_steps, integration, slow_lora,
                         fast_lora, lora_scale, lora_mode, seed, output_type, static, conds, true_cfg_scale)

    def _run(self, batch, latents, height, width, schedule, num_inference_steps, integration, slow_lora,
             fast_lora, lora_scale, lora_mode, seed, output_type, static, conds, cfg_scale=1.0):
        if output_type not in ("latent", "unpacked_latent", "np", "pil"):
            raise GlanceError(f"unknown output_type {output_type!r}: use 'latent', 'unpacked_latent', 'np' or 'pil'")
        if output_type in ("np", "pil") and self.vae is None:
            raise GlanceError(f"output_type {output_type!r} needs a VAE: build the pipeline with vae=(vae, params)")
        lora_mode = self._lora_mode(lora_mode)
        _check_lora(slow_lora, "slow_lora")
        _check_lora(fast_lora, "fast_lora")
        for tree in (slow_lora, fast_lora):  # both LoRA modes: a misfit names its layer before any compute
            if tree is not None:
                check_shapes(self.params, tree)
        if not np.isfinite(lora_scale):
            raise GlanceError(f"lora_scale {lora_scale!r}: must be a finite number")
        for tree, name in ((slow_lora, "slow_lora"), (fast_lora, "fast_lora")):  # finite, and mergeable and back
            if tree is not None:
                check_values(self.params, tree, lora_scale, merge=lora_mode == "merge", name=name)
        rows, cols = self.family.latent_grid(height, width, self.vae_scale_factor)
        if latents is None:
            latents = self.noise(seed, batch, height, width)
        latents = jnp.asarray(latents, self.model.dtype)
        if latents.shape != (batch, rows * cols, 4 * self.latent_channels):
            raise GlanceError(f"latents of shape {latents.shape} do not fit {batch} images of {height}x{width}")
        phases = phase_steps(self.scheduler_config, rows * cols, schedule, num_inference_steps, integration)
        if len(phases) == 1 and (slow_lora is not None or fast_lora is not None):
            raise GlanceError("slow_lora and fast_lora need schedule=GlanceSchedule(...)")
        loras = [None] if len(phases) == 1 else [slow_lora, fast_lora]
        if loras == [None, None]:  # a Glance schedule without LoRAs: one run of steps, the plain sampler's program
            phases, loras = [tuple(np.concatenate(arrays) for arrays in zip(*phases))], [None]
        self.last_nfe = sum(len(t) for t, _ in phases) * len(conds)
        phases = [(jnp.asarray(_padded(t)), jnp.asarray(_padded(dt)), jnp.int32(len(t))) for t, dt in phases]
        if self.mesh is not None:  # prompts over `data`; everything without a batch axis replicated
            put = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, x.shape) if x.ndim and
                                           x.shape[0] == batch else sharding.replicated(self.mesh))
            latents, conds = put(latents), jax.tree_util.tree_map(put, conds)
            phases = jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding.replicated(self.mesh)), phases)
        in_place = lora_mode == "merge" and any(lora is not None for lora in loras)
        sample = _sample_donating if in_place else _sample_plain
        latents, self.params = sample(self.model, lora_mode, static, self.family.cfg_rescale, self.params, loras,
                                      phases, latents, conds, jnp.float32(cfg_scale), jnp.float32(lora_scale))
        if output_type == "latent":
            return latents
        unpacked = self.family.unpack_latents(latents, height, width, self.vae_scale_factor)
        if output_type == "unpacked_latent":
            return unpacked
        images = np.asarray(decode_latents(*self.vae, unpacked, self.tiled_vae), np.float32)
        images = np.clip(images / 2 + 0.5, 0.0, 1.0)  # diffusers' image processor: [-1, 1] -> [0, 1]
        if output_type == "np":
            return images
        from PIL import Image
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]

    def _lora_mode(self, lora_mode):
        """None -> "merge" for a float base, "unmerged" for a quantized one (8-bit kernels are never merged into)."""
        quantized = is_quantized(self.params)
        if lora_mode is None:
            return "unmerged" if quantized else "merge"
        if lora_mode not in ("merge", "unmerged"):
            raise GlanceError(f"unknown lora_mode {lora_mode!r}: use 'merge' or 'unmerged'")
        if lora_mode == "merge" and quantized:
            raise GlanceError(f"lora_mode='merge' needs a float base; this one is {kind_of(self.params)}: "
                              "use lora_mode='unmerged' (the default for quantized bases)")
        return lora_mode

    def _encode(self, prompt, images=()):
        if self.prompt_encoder is None:
            raise GlanceError("prompt strings need a prompt encoder: build the pipeline with prompt_encoder=... "
                              "(the family's), or pass prompt_embeds")
        if self.family.prompt_sees_images:
            return self.prompt_encoder(prompt, self.family.prompt_images(images))
        return self.prompt_encoder(prompt)

    def _source_images(self, image, given=False):
        """The source images of an edit as RGB PIL images, checked against what the family takes (`given`: their
        latents came in the encodings instead)."""
        if image is None:
            if self.family.reference_images and not given:
                raise GlanceError(f"{self.family.name} edits a source image: pass image=... (or image_latents in "
                                  "the encodings)")
            return []
        if given:
            raise GlanceError("pass the source images as image=... or as image_latents in the encodings, not both")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not self.family.reference_images:
            raise GlanceError(f"{self.family.name} takes no source image (it is no editing model)")
        if not 1 <= len(images) <= self.family.reference_images:
            raise GlanceError(f"{len(images)} source images: {self.family.name} takes 1 to "
                              f"{self.family.reference_images}")
        return [_pil(i) for i in images]

    def image_latents(self, images, image_size=None, batch=1):
        """The VAE latents of source images (PIL), each resized to `image_size` (or the family's size for it), as
        a tuple of (batch, h, w, C) arrays: what the conditioning appends to the image tokens."""
        if self.vae is None:
            raise GlanceError("a source image needs the VAE: build the pipeline with vae=(vae, params)")
        latents = []
        for image in images:
            size = image_size or self.family.reference_size(image.height, image.width)
            self.family.latent_grid(*size, self.vae_scale_factor)  # refuses a size that makes no grid
            encoded = encode_images(*self.vae, image_pixels(image, *size)[None])
            latents.append(jnp.broadcast_to(encoded, (batch,) + encoded.shape[1:]).astype(self.model.dtype))
        return tuple(latents)

    def noise(self, seed, batch, height, width):
        """Packed Gaussian noise, one PRNG key per image: `seed` (int) gives images seed, seed + 1, ..."""
        seeds = [seed + i for i in range(batch)] if np.isscalar(seed) else list(seed)
        if len(seeds) != batch:
            raise GlanceError(f"{len(seeds)} seeds for {batch} prompts")
        self.family.latent_grid(height, width, self.vae_scale_factor)  # refuses a size that makes no grid
        shape = (height // self.vae_scale_factor, width // self.vae_scale_factor, self.latent_channels)
        return _packed_noise(jnp.asarray(seeds, jnp.uint32), shape, self.family)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _packed_noise(seeds, shape, family):
    """Noise latents of `shape` (H, W, C), one per seed, packed as `family` packs them."""
    draw = lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32)
    return family.pack_latents(jax.vmap(draw)(seeds))


class FluxGlancePipeline(GlancePipeline):
    """Slow-Fast sampling for FLUX.1 with the transformer `(model, params)` and a scheduler config dict."""

    family = families.FLUX

    def __call__(self, prompt_embeds=None, pooled_prompt_embeds=None, latents=None, height=1024, width=1024,
                 num_inference_steps=None, schedule=None, guidance_scale=3.5, slow_lora=None, fast_lora=None,
                 lora_scale=1.0, integration="consistent", seed=0, output_type="latent", lora_mode=None,
                 prompt=None, negative_prompt=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 true_cfg_scale=1.0):
        """`sample` with diffusers' FluxPipeline argument names: true CFG runs with a negative prompt (strings,
        or `negative_prompt_embeds` + `negative_pooled_prompt_embeds`) and `true_cfg_scale > 1`."""
        if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
            raise GlanceError("pass both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
        return self.sample({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds},
                           {"prompt_embeds": negative_prompt_embeds,
                            "pooled_prompt_embeds": negative_pooled_prompt_embeds},
                           prompt, negative_prompt, latents, height, width, num_inference_steps, schedule,
                           guidance_scale, true_cfg_scale, slow_lora, fast_lora, lora_scale, integration, seed,
                           output_type, lora_mode)


class FluxKontextGlancePipeline(GlancePipeline):
    """Slow-Fast editing with FLUX.1 Kontext: the transformer `(model, params)`, a scheduler dict and the VAE."""

    family = families.FLUX_KONTEXT

    def __call__(self, image=None, prompt=None, negative_prompt=None, true_cfg_scale=1.0, height=None, width=None,
                 num_inference_steps=None, schedule=None, guidance_scale=3.5, latents=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="latent", max_area=1024 ** 2, _auto_resize=True, slow_lora=None, fast_lora=None,
                 lora_scale=1.0, integration="consistent", seed=0, lora_mode=None):
        """`sample` with diffusers' FluxKontextPipeline arguments and sizes: the output has `max_area` pixels at
        the aspect ratio of `height` x `width` (default 1024 x 1024); the source image is resized to Kontext's
        preferred resolution nearest its aspect ratio (`_auto_resize`) or kept at its size, both cut to
        multiples of 16."""
        if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
            raise GlanceError("pass both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
        multiple = 2 * self.vae_scale_factor
        height, width = height or 1024, width or 1024
        width, height = round((max_area * width / height) ** 0.5), round((max_area * height / width) ** 0.5)
        height, width = height // multiple * multiple, width // multiple * multiple
        image_size = None
        if image is not None and not _auto_resize:
            first = _pil(image[0] if isinstance(image, (list, tuple)) else image)
            image_size = first.height // multiple * multiple, first.width // multiple * multiple
        return self.sample({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds},
                           {"prompt_embeds": negative_prompt_embeds,
                            "pooled_prompt_embeds": negative_pooled_prompt_embeds},
                           prompt, negative_prompt, latents, height, width, num_inference_steps, schedule,
                           guidance_scale, true_cfg_scale, slow_lora, fast_lora, lora_scale, integration, seed,
                           output_type, lora_mode, image, image_size)


class QwenImageGlancePipeline(GlancePipeline):
    """Slow-Fast sampling for Qwen-Image with true CFG, from the transformer `(model, params)` and a scheduler dict."""

    family = families.QWEN_IMAGE  # true CFG rescales to the conditional norm, as diffusers' QwenImagePipeline

    def __call__(self, prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, true_cfg_scale=4.0, latents=None, height=1024, width=1024,
                 num_inference_steps=None, schedule=None, slow_lora=None, fast_lora=None, lora_scale=1.0,
                 integration="consistent", seed=0, output_type="latent", lora_mode=None, prompt=None,
                 negative_prompt=None):
        """`sample` with diffusers' QwenImagePipeline argument names: true CFG (two passes a step, norm rescale)
        runs when a negative prompt is given and `true_cfg_scale > 1`. The official Glance pipeline uses
        `true_cfg_scale=5` with the negative prompt " ". Masks are 1 for real tokens and 0 for padding; None
        means no padding."""
        return self.sample({"prompt_embeds": prompt_embeds, "prompt_embeds_mask": prompt_embeds_mask},
                           {"prompt_embeds": negative_prompt_embeds,
                            "prompt_embeds_mask": negative_prompt_embeds_mask},
                           prompt, negative_prompt, latents, height, width, num_inference_steps, schedule, None,
                           true_cfg_scale, slow_lora, fast_lora, lora_scale, integration, seed, output_type, lora_mode)


class QwenImageEditGlancePipeline(GlancePipeline):
    """Slow-Fast editing with Qwen-Image-Edit: the transformer `(model, params)`, a scheduler dict and the VAE."""

    family = families.QWEN_IMAGE_EDIT

    def __call__(self, image=None, prompt=None, negative_prompt=None, true_cfg_scale=4.0, height=None, width=None,
                 num_inference_steps=None, schedule=None, latents=None, prompt_embeds=None, prompt_embeds_mask=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, output_type="latent",
                 slow_lora=None, fast_lora=None, lora_scale=1.0, integration="consistent", seed=0, lora_mode=None):
        """`sample` with diffusers' QwenImageEditPipeline (QwenImageEditPlusPipeline) arguments and sizes: each
        source image is VAE-encoded at about 1024 x 1024 (multiples of 32) and seen by the prompt encoder; the
        edit has the last one's size unless `height` and `width` are given (cut to multiples of 16). True CFG
        (two passes a step, norm rescale) runs with a negative prompt and `true_cfg_scale > 1`."""
        multiple = 2 * self.vae_scale_factor
        height, width = (None if v is None else v // multiple * multiple for v in (height, width))
        return self.sample({"prompt_embeds": prompt_embeds, "prompt_embeds_mask": prompt_embeds_mask},
                           {"prompt_embeds": negative_prompt_embeds,
                            "prompt_embeds_mask": negative_prompt_embeds_mask},
                           prompt, negative_prompt, latents, height, width, num_inference_steps, schedule, None,
                           true_cfg_scale, slow_lora, fast_lora, lora_scale, integration, seed, output_type, lora_mode,
                           image)


class QwenImageEditPlusGlancePipeline(QwenImageEditGlancePipeline):
    """Slow-Fast editing with Qwen-Image-Edit-2509 ("Plus"): up to three source images."""

    family = families.QWEN_IMAGE_EDIT_PLUS
