"""The teacher target's parts: all-Dense LoRA presets, uniform and fitted schedules, batched (guided) trajectories."""

import itertools
import json
import logging
import os
import re

import jax
import numpy as np
import pytest

from glance_jax import checkpoints, families, lora, train_config, trajectories
from glance_jax.checkpoints import safetensors_io
from glance_jax.demo import lora_config, teacher, write_sample
from glance_jax.errors import GlanceError
from glance_jax.models import FluxTransformer2DModel, QwenImageTransformer2DModel
from glance_jax.pipelines import FluxGlancePipeline
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from glance_jax.schedules import FlowMatchEulerScheduler, GlanceSchedule, best_jumps, jump_errors
from glance_jax.train import choose_schedule, compile_step, prepare, teacher_inputs, train_phases
from glance_jax.trajectories import teacher_grid


# ---- presets ----

def test_all_dense_presets_cover_every_block_layer_and_nothing_outside():
    _, params = FluxTransformer2DModel.from_pretrained(teacher.TEACHER_DIR)
    names = set(lora.dense_layers(params))
    chosen = {n for n in names if lora.matches(n, families.lora_preset("flux-all"))}
    assert chosen == {n for n in names if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert "single_transformer_blocks.3.proj_out" in chosen and "proj_out" not in chosen
    assert {n for n in names if lora.matches(n, families.lora_preset("flux"))} < chosen  # the official four are inside
    tree = lora.init_lora(jax.random.PRNGKey(0), params, "flux-all", 4, 16.0)
    assert lora.describe(tree).startswith(f"{len(chosen)} layers")

    qwen = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                       axes_dims_rope=(4, 6, 6))
    names = set(lora.dense_layers(jax.eval_shape(qwen.init_params, jax.random.PRNGKey(0))))
    chosen = {n for n in names if lora.matches(n, families.lora_preset("qwen-image-all"))}
    assert chosen == {n for n in names if n.startswith("transformer_blocks.")}
    assert len(chosen) == 2 * 14  # q, k, v, out, add q/k/v, add out, two MLPs of two layers, two modulations


# ---- schedules ----

def test_uniform_schedule_is_the_bases_own_k_step_schedule():
    timesteps, _ = FlowMatchEulerScheduler.from_config(FLUX_SCHEDULER).set_timesteps(6, 16)
    s = GlanceSchedule.uniform(FLUX_SCHEDULER, 3, 3, 16)
    np.testing.assert_array_equal(np.float32(s.slow + s.fast), timesteps)
    assert len(s.slow) == 3 and s.for_image_seq_len(4096).num_steps == 6


def test_best_jumps_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    n = 8
    errors = np.triu(rng.uniform(0.1, 1.0, (n, n)), 1)
    errors[np.tril_indices(n)] = np.inf
    for k in (1, 2, 3, 5, 7):
        cost = lambda path: sum(errors[a, b] for a, b in zip(path, path[1:]))
        best = min(([0, *middle, n - 1] for middle in itertools.combinations(range(1, n - 1), k - 1)), key=cost)
        got = best_jumps(errors, k)
        assert len(got) == k + 1 and got[0] == 0 and got[-1] == n - 1
        assert cost(got) == pytest.approx(cost(best))


def test_jump_errors_measure_one_euler_step():
    sigmas = np.array([1.0, 0.5, 0.0])
    v = np.array([[2.0], [4.0]])  # the velocities of one 1-element trajectory, and its Euler states
    x0 = np.array([1.0])
    x1 = x0 + (sigmas[1] - sigmas[0]) * v[0]
    x2 = x1 + (sigmas[2] - sigmas[1]) * v[1]
    errors = jump_errors(np.stack([x0, x1, x2])[None], sigmas)
    assert errors[0, 1] == errors[1, 2] == 0  # single fine steps are exact
    assert errors[0, 2] == pytest.approx(abs(x0 + (0 - 1) * v[0] - x2)[0])  # one jump with v at sigma 1
    states = np.random.default_rng(1).standard_normal((2, 11, 3))
    fitted = GlanceSchedule.fitted(FLUX_SCHEDULER, states, 5, 5, 16, base_steps=10)  # K = the grid: every step
    assert fitted.slow_steps == (1, 2, 3, 4, 5) and fitted.fast_steps == (6, 7, 8, 9, 10)


# ---- trajectories ----

def demo_run(tmp_path, guidance, passes=1):
    sample = tmp_path / "sample"
    write_sample(str(sample), teacher.load_prompts())
    c = lora_config(teacher.TEACHER_DIR, str(sample), str(tmp_path), 4, "teacher", "uniform", 2, 3, guidance, 0,
                    passes=passes)
    c.teacher.substeps, c.teacher.batch = 4, 2  # the uniform 4-step schedule is the whole grid; two calls
    return prepare(c, tmp_path / "run")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_trajectories_are_what_the_sampler_computes(tmp_path, guidance):
    """The trainer's batched (guided) trajectories end where the pipeline's own 4-step sampler ends from the
    same noise (true CFG on the empty prompt for guidance 3, with the demo's extra captions: trajectory k on
    caption k mod 10), and are read back from the cache."""
    run = demo_run(tmp_path, guidance)
    grid = teacher_grid(run.schedule, FLUX_SCHEDULER, 4, 16)
    np.testing.assert_array_equal(grid, FlowMatchEulerScheduler.from_config(FLUX_SCHEDULER).set_timesteps(
        4, 16)[1])
    states = np.asarray(trajectories.cached(run, grid))
    noises = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 10 ** 6), (3, 1, 16, 4))
    assert states.shape == (3, 5, 16, 4)
    np.testing.assert_array_equal(states[:, 0], np.asarray(noises[:, 0]))
    pipe = FluxGlancePipeline(run.model, run.params, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)
    prompts = teacher.load_prompts()
    captions = ["a handwritten seven"] + (["a handwritten zero", "a handwritten one"] if guidance > 1 else
                                          ["a handwritten seven"] * 2)
    assert tuple(run.config.teacher.prompts[:2]) == (tuple(captions[1:]) if guidance > 1 else ())
    embed = lambda cs, i: np.stack([prompts[c][i] for c in cs])
    negative = dict(negative_prompt_embeds=embed([""] * 3, 0), negative_pooled_prompt_embeds=embed([""] * 3, 1),
                    true_cfg_scale=guidance) if guidance > 1 else {}
    final = pipe(embed(captions, 0), embed(captions, 1), latents=noises[:, 0],
                 height=8, width=8, num_inference_steps=4, **negative)
    assert pipe.last_nfe == (8 if guidance > 1 else 4)
    np.testing.assert_allclose(states[:, -1], np.asarray(final), rtol=1e-4, atol=1e-5)
    cached = [f for f in os.listdir(tmp_path / "cache") if f.startswith("teacher-")]
    assert len(cached) == 1
    np.testing.assert_array_equal(np.asarray(trajectories.cached(run, grid)), states)  # read back, not recomputed
    trained_on = teacher_inputs(run)  # what the train step reads: the states at the Glance points, then 0
    np.testing.assert_array_equal(np.asarray(trained_on["sigmas"])[:5], grid)
    np.testing.assert_array_equal(np.asarray(trained_on["states"])[:, :5], states)


def test_a_two_pass_student_starts_where_the_guided_teacher_steps(tmp_path):
    """While the LoRAs still add nothing (B = 0), the two-pass student's velocity (true CFG over both passes, as the
    sampler combines them) is the guided base's own, so its first loss against the guided teacher's one-step jumps
    is zero up to rounding, where a one-pass student's is not; each pair's files record how it samples."""
    first_loss, regimes = {}, {}
    for passes in (1, 2):
        run = demo_run(tmp_path / str(passes), 3.0, passes)
        files = train_phases(run)
        with open(tmp_path / str(passes) / "run" / "metrics.jsonl") as f:
            first_loss[passes] = json.loads(f.readline())["loss"]
        regimes[passes] = lora.read_guidance(files["fast"])
    print(f"first loss: one-pass student {first_loss[1]:.3e}, two-pass student {first_loss[2]:.3e}")
    assert first_loss[1] > 1e-4 and first_loss[2] < 1e-6 * first_loss[1]
    assert regimes == {1: {"true_cfg_scale": 1.0, "negative_prompt": None, "passes_per_step": 1},
                       2: {"true_cfg_scale": 3.0, "negative_prompt": "", "passes_per_step": 2}}


@pytest.mark.parametrize("key,value,message", [
    ("student.negative_prompt", "blurry", "config.student.negative_prompt 'blurry': only the empty prompt"),
    ("data.caption_dropout", 0.1, "config.data.caption_dropout 0.1 with config.student.guidance_scale > 1"),
    ("student.guidance_scale", float("nan"), "config.student.guidance_scale nan"),
])
def test_student_guidance_is_checked_before_loading(tmp_path, key, value, message):
    config = lora_config(teacher.TEACHER_DIR, str(tmp_path / "sample"), str(tmp_path), 4, "teacher", "uniform", 2, 3,
                         3.0, 0, passes=2)
    train_config.check(config)  # the working config passes
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(GlanceError, match=re.escape(message)):
        train_config.check(config)


def test_a_guidance_input_student_is_flux_dev_shaped(tmp_path):
    """student.guidance_input trains a guidance embedding beside the LoRAs on trajectories guided over a range of
    scales; its files carry it under FLUX.1-dev's names, so diffusers' FluxTransformer2DModel with a guidance
    embedding (the teacher's weights plus those) and the LoRA loaded through peft computes what the student
    computes here at any scale (fp32)."""
    import torch
    from diffusers import FluxTransformer2DModel as TorchFlux
    from torch_peers import flux_inputs, relative_error, torch_forward
    sample = tmp_path / "sample"
    write_sample(str(sample), teacher.load_prompts())
    c = lora_config(teacher.TEACHER_DIR, str(sample), str(tmp_path), 4, "teacher", "uniform", 3, 4, 3.0, 0)
    c.teacher.substeps, c.teacher.batch = 4, 2
    c.student.guidance_input, c.teacher.guidance_range = True, (1.0, 5.0)
    c.optim.lr = 1e-2  # three steps that move the embedder and the LoRA visibly
    run = prepare(c, tmp_path / "run")
    np.testing.assert_allclose(np.asarray(teacher_inputs(run)["scales"]), [1, 7 / 3, 11 / 3, 5], rtol=1e-6)
    files = train_phases(run)
    regime = lora.read_guidance(files["slow"])
    assert regime["passes_per_step"] == 1 and regime["guidance_input"] == {"range": [1.0, 5.0], "default": 3.0}
    tensors = safetensors_io.SafetensorsFile(files["slow"])
    embedder = {k[len("glance_guidance_embedder."):]: torch.from_numpy(np.array(tensors.read(k)))
                for k in tensors.keys() if k.startswith("glance_guidance_embedder.")}
    assert sorted(embedder) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert float(embedder["linear_2.weight"].abs().max()) > 0  # trained away from its zero start
    base = TorchFlux.from_pretrained(teacher.TEACHER_DIR)
    student = TorchFlux(**{**dict(base.config), "guidance_embeds": True}).eval()
    state = {**base.state_dict(), **{f"time_text_embed.guidance_embedder.{k}": v for k, v in embedder.items()}}
    student.load_state_dict(state)
    student.load_lora_adapter(str(tmp_path / "run"), weight_name="slow_lora.safetensors", prefix="transformer")
    tree = lora.load_lora(files["slow"], run.params)
    for scale in (1.5, 4.0):
        inputs = flux_inputs({**dict(base.config), "guidance_embeds": True}, 2, (2, 2), teacher.TEXT_TOKENS,
                             guidance=scale)
        want = torch_forward(student, inputs)
        got = run.model.apply({"params": run.params, "lora": tree}, **inputs)
        err = relative_error(got, want)
        print(f"guidance-input student at scale {scale} vs diffusers (guidance embedder + peft LoRA): {err:.2e}")
        assert err <= 1e-4
    no_input = run.model.apply({"params": run.params, "lora": tree}, **{**inputs, "guidance": None})
    assert relative_error(no_input, want) > 1e-3  # the check can fail: the embedding changes the output


def test_compile_step_compiles_the_program_that_training_runs(tmp_path, caplog):
    """compile_step (the demo calls it on a second thread while other pairs train) compiles the very
    train step that train() then runs: training compiles no step program of its own."""
    run = demo_run(tmp_path, 3.0)  # the guided students' step: minibatch 8
    run.config.optim.lr = 1.2345e-4  # a program no other test compiles
    step_compiles = lambda: [r for r in caplog.records if r.getMessage().startswith("Compiling jit(train_step)")]
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        compile_step(run)
        assert len(step_compiles()) == 1
        caplog.clear()
        files = train_phases(run)
        assert step_compiles() == []
    assert sorted(files) == ["fast", "slow"] and all(os.path.isfile(f) for f in files.values())


def test_runs_can_share_one_loaded_base(tmp_path):
    """prepare(base=...) trains on the caller's arrays (no second copy of the base) and gives the LoRAs of a run that
    loads its own; a base that config.model does not describe is refused in one line before anything is written."""
    own = demo_run(tmp_path, 1.0)
    base = families.load_model(teacher.TEACHER_DIR)
    shared = prepare(own.config, tmp_path / "shared", base=base)
    assert shared.params is base[1]
    mine, theirs = train_phases(own), train_phases(shared)
    for phase in ("slow", "fast"):
        a, b = (safetensors_io.SafetensorsFile(files[phase]) for files in (mine, theirs))
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 0
        for name in a.keys():
            np.testing.assert_array_equal(a.read(name), b.read(name))
    config = own.config.copy_and_resolve_references()
    config.model.dtype = "bf16"  # a working run on its own (it would load a bf16 base); not the fp32 base given
    with pytest.raises(GlanceError, match=re.escape("prepare(base=...): not the base config.model describes")):
        prepare(config, tmp_path / "refused", base=base)
    assert not (tmp_path / "refused").exists()


def test_fitted_schedule_is_chosen_on_the_cached_trajectories(tmp_path):
    run = demo_run(tmp_path, 1.0)
    run.config.schedule.kind, run.config.teacher.substeps = "fitted", 12
    schedule = choose_schedule(run)
    grid = teacher_grid(None, FLUX_SCHEDULER, 12, 16)
    states = np.asarray(trajectories.cached(run, grid))
    path = best_jumps(jump_errors(states, grid), 4)
    assert schedule.slow_steps + schedule.fast_steps == tuple(i + 1 for i in path[:-1])
    assert schedule.base_steps == 12 and len(schedule.slow) == 2


def test_a_quantized_base_gets_its_own_cached_trajectories(tmp_path):
    """The cache key covers the base's quantization: an int8 run beside an fp32 one integrates anew."""
    run = demo_run(tmp_path, 1.0)
    grid = teacher_grid(run.schedule, FLUX_SCHEDULER, 4, 16)
    plain = np.asarray(trajectories.cached(run, grid))
    config = run.config.copy_and_resolve_references()
    config.model.quantize = "int8"
    quantized = np.asarray(trajectories.cached(prepare(config, tmp_path / "run_int8"), grid))
    assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("teacher-")]) == 2
    assert not np.array_equal(quantized, plain)


@pytest.mark.parametrize("key,value,message", [
    ("prompts", ("a handwritten one", " "), "config.teacher.prompts ('a handwritten one', ' '): a list of non-empty"),
    ("minibatch", 0, "config.teacher.minibatch 0"),
])
def test_teacher_settings_are_checked_before_loading(tmp_path, key, value, message):
    config = lora_config(teacher.TEACHER_DIR, str(tmp_path / "sample"), str(tmp_path), 4, "teacher", "uniform", 2, 3,
                         3.0, 0)
    train_config.check(config)  # the working config passes
    config.teacher[key] = value
    with pytest.raises(GlanceError, match=re.escape(message)):
        train_config.check(config)


def test_extra_captions_must_match_the_encoded_sample(tmp_path, monkeypatch):
    """config.teacher.prompts names the captions the encoded sample's teacher_prompt_embeds hold, one each;
    a mismatch is refused before the base loads."""
    sample = tmp_path / "sample"
    write_sample(str(sample), teacher.load_prompts())
    config = lora_config(teacher.TEACHER_DIR, str(sample), str(tmp_path), 4, "teacher", "uniform", 2, 3, 3.0, 0)
    loads = []
    real_load = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    assert prepare(config, tmp_path / "good").params and len(loads) == 1  # the working config loads the base
    config.teacher.prompts = config.teacher.prompts[:3]
    with pytest.raises(GlanceError, match="names 3 prompts, the encoded sample has 9 teacher_prompt_embeds"):
        prepare(config, tmp_path / "run")
    assert len(loads) == 1 and not (tmp_path / "run").exists()
