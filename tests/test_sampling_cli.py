"""`sample` and `eval` with LoRA files that carry their schedule, and eval's comparison at equal cost.

Runs on the demo's committed teacher with small random LoRAs (no training needed).
"""

import json

import jax
import numpy as np
import pytest

from glance_jax import evaluation, families
from glance_jax.checkpoints import safetensors_io
from glance_jax.cli import main
from glance_jax.demo import teacher
from glance_jax.lora import init_lora, load_lora, read_guidance, save_lora
from glance_jax.pipelines import FluxGlancePipeline
from glance_jax.schedules import GlanceSchedule

PROMPT = "the numeral three, written by hand"


def random_lora(params, seed):
    tree = init_lora(jax.random.PRNGKey(seed), params, "flux", rank=2, alpha=2.0)
    return jax.tree_util.tree_map_with_path(  # B starts at zero: give it values so the LoRAs change the output
        lambda p, x: 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape) if p[-1].key == "B" else x, tree)


def write_pair(folder, params, schedule, **kw):
    """slow.safetensors and fast.safetensors in `folder`: random LoRAs written with `schedule` (and `kw`)."""
    for i, phase in enumerate(("slow", "fast")):
        save_lora(random_lora(params, 10 * i), folder / f"{phase}.safetensors", schedule=schedule, **kw)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A slow and a fast LoRA for a 4-step schedule (2 + 2 steps of 50), written with that schedule."""
    folder = tmp_path_factory.mktemp("loras")
    _, params = families.load_model(teacher.TEACHER_DIR)
    schedule = GlanceSchedule.from_steps(teacher.SCHEDULER, (1, 5), (16, 36), image_seq_len=16)
    write_pair(folder, params, schedule)
    other = GlanceSchedule.from_steps(teacher.SCHEDULER, (1, 3), (11, 41), image_seq_len=16)
    save_lora(random_lora(params, 30), folder / "other_fast.safetensors", schedule=other)
    return folder, schedule


def lora_args(folder, fast="fast.safetensors"):
    return ["--slow_lora", str(folder / "slow.safetensors"), "--fast_lora", str(folder / fast)]


def test_sample_uses_the_schedule_the_loras_carry(lora_files, tmp_path):
    folder, schedule = lora_files
    out = tmp_path / "three.safetensors"
    assert main(["sample", "--prompt", PROMPT, "--out", str(out), "--seed", "3", *lora_args(folder)]) == 0
    got = safetensors_io.SafetensorsFile(out).read("latents")
    model, params = families.load_model(teacher.TEACHER_DIR)
    pipe = FluxGlancePipeline(model, params, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)
    states, pooled = teacher.load_prompts()[PROMPT]
    want = pipe(states[None], pooled[None], height=8, width=8, schedule=schedule, seed=3, output_type="unpacked_latent",
                slow_lora=load_lora(folder / "slow.safetensors", pipe.params),
                fast_lora=load_lora(folder / "fast.safetensors", pipe.params))
    assert pipe.last_nfe == 4
    np.testing.assert_allclose(got, np.asarray(want)[0], rtol=0, atol=1e-6)


def test_eval_compares_at_equal_cost(lora_files, tmp_path, capsys):
    folder, schedule = lora_files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\nthe number five\n")
    assert main(["eval", "--prompts", str(prompts), "--seeds", "0,1", "--workdir", str(tmp_path / "eval"),
                 *lora_args(folder)]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = {r["name"]: r for r in report["runs"]}
    assert list(rows) == ["base-50", "glance-4", "base-4", "base-8"]  # reference, Glance, base at 1x and 2x its cost
    assert [rows[n]["nfe"] for n in rows] == [50, 4, 4, 8] and rows["glance-4"]["kind"] == "glance"
    assert GlanceSchedule.from_dict(report["schedule"]) == schedule  # the LoRAs' own schedule was used
    assert rows["base-8"]["psnr_vs_base"] > rows["base-4"]["psnr_vs_base"]  # more steps, closer to 50
    glance = rows["glance-4"]
    want = evaluation.speedup([4, 8], [rows["base-4"]["psnr_vs_base"], rows["base-8"]["psnr_vs_base"]],
                              glance["psnr_vs_base"], 4)
    assert (glance["equivalent_base_nfe"], glance["speedup"], glance["extrapolated"]) == pytest.approx(want)
    assert f"glance-4: the base needs {want[0]:.1f} evaluations" in capsys.readouterr().out


@pytest.mark.parametrize("extra,fast,message", [
    (["--schedule", "1,3|11,41"], "fast.safetensors", "is not the schedule --slow_lora was trained for (slow 1000"),
    ([], "other_fast.safetensors", "--slow_lora and --fast_lora were trained for different schedules"),
])
def test_a_lora_and_its_schedule_are_not_separated(lora_files, tmp_path, capsys, extra, fast, message):
    folder, _ = lora_files
    out = tmp_path / "x.safetensors"
    assert main(["sample", "--prompt", PROMPT, "--out", str(out), *lora_args(folder, fast), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glance-jax sample: error:") and message in err[0]
    assert not out.exists()


GUIDED = {"true_cfg_scale": 3.0, "negative_prompt": "", "passes_per_step": 2}


@pytest.fixture(scope="module")
def guided_lora_files(tmp_path_factory):
    """The slow and fast LoRAs of `lora_files`, written as a pair trained for true CFG 3 on the empty prompt."""
    folder = tmp_path_factory.mktemp("guided_loras")
    _, params = families.load_model(teacher.TEACHER_DIR)
    schedule = GlanceSchedule.from_steps(teacher.SCHEDULER, (1, 5), (16, 36), image_seq_len=16)
    write_pair(folder, params, schedule, guidance=GUIDED)
    save_lora(random_lora(params, 30), folder / "unguided_fast.safetensors", schedule=schedule,
              guidance={"true_cfg_scale": 1.0, "negative_prompt": None, "passes_per_step": 1})
    return folder, schedule


def test_sample_uses_the_guidance_the_loras_carry(guided_lora_files, tmp_path, capsys):
    """LoRAs trained for true CFG sample with it (two passes a step, counted) when no flag is given."""
    folder, schedule = guided_lora_files
    assert read_guidance(folder / "slow.safetensors") == GUIDED
    out = tmp_path / "three.safetensors"
    assert main(["sample", "--prompt", PROMPT, "--out", str(out), "--seed", "3", *lora_args(folder)]) == 0
    assert "(8 transformer passes; true CFG 3 on '', 2 passes a step)" in capsys.readouterr().out
    got = safetensors_io.SafetensorsFile(out).read("latents")
    model, params = families.load_model(teacher.TEACHER_DIR)
    pipe = FluxGlancePipeline(model, params, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)
    prompts = teacher.load_prompts()
    loras = dict(slow_lora=load_lora(folder / "slow.safetensors", pipe.params),
                 fast_lora=load_lora(folder / "fast.safetensors", pipe.params))
    run = lambda **cfg: np.asarray(pipe(prompts[PROMPT][0][None], prompts[PROMPT][1][None], height=8, width=8,
                                        schedule=schedule, seed=3, output_type="unpacked_latent", **loras, **cfg))[0]
    want = run(negative_prompt_embeds=prompts[""][0][None], negative_pooled_prompt_embeds=prompts[""][1][None],
               true_cfg_scale=3.0)
    assert pipe.last_nfe == 8
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(run() - want).max() > 1e-3  # the check can fail: without CFG the image differs


def test_eval_of_a_guided_pair_runs_every_row_guided(guided_lora_files, tmp_path):
    folder, _ = guided_lora_files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    assert main(["eval", "--prompts", str(prompts), "--workdir", str(tmp_path / "eval"), "--base_steps", "20",
                 *lora_args(folder)]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = {r["name"]: r["nfe"] for r in report["runs"]}
    assert rows == {"base-cfg-20": 40, "glance-cfg-4": 8, "base-cfg-4": 8, "base-cfg-8": 16}
    assert (report["true_cfg_scale"], report["negative_prompt"]) == (3.0, "")


@pytest.mark.parametrize("extra,fast,message", [
    (["--true_cfg_scale", "1"], "fast.safetensors",
     "--true_cfg_scale 1.0 is not the guidance --slow_lora was trained for (true CFG 3 on '', 2 passes a step)"),
    (["--negative_prompt", "blurry"], "fast.safetensors", "--negative_prompt 'blurry' is not the guidance"),
    ([], "unguided_fast.safetensors", "--slow_lora and --fast_lora were trained for different guidance "
     "(true CFG 3 on '', 2 passes a step; no CFG, 1 pass a step)"),
])
def test_a_lora_and_its_guidance_are_not_separated(guided_lora_files, tmp_path, capsys, extra, fast, message):
    folder, _ = guided_lora_files
    out = tmp_path / "x.safetensors"
    assert main(["sample", "--prompt", PROMPT, "--out", str(out), *lora_args(folder, fast), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glance-jax sample: error:") and message in err[0], err
    assert not out.exists()


def test_a_trained_guidance_input_samples_at_its_scale_and_refuses_others(tmp_path, capsys):
    """LoRAs that carry a trained guidance embedding sample at their default scale, take --guidance_scale inside
    the range they were trained for, and refuse one outside it in one line, writing nothing."""
    _, params = families.load_model(teacher.TEACHER_DIR)
    schedule = GlanceSchedule.from_steps(teacher.SCHEDULER, (1, 5), (16, 36), image_seq_len=16)
    regime = {"true_cfg_scale": 1.0, "negative_prompt": None, "passes_per_step": 1,
              "guidance_input": {"range": [2.0, 4.0], "default": 3.0}}
    for i, phase in enumerate(("slow", "fast")):
        tree = families.FLUX.add_guidance_embedder(jax.random.PRNGKey(i), random_lora(params, 10 * i), params)
        embedder = tree["time_text_embed"]["glance_guidance_embedder"]
        kernel = embedder["linear_2"]["kernel"]  # zero at its start: give it values so the scale matters
        embedder["linear_2"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(7), kernel.shape)
        save_lora(tree, tmp_path / f"{phase}.safetensors", schedule=schedule, guidance=regime)
    out = lambda name: tmp_path / name
    run = lambda name, *extra: main(["sample", "--prompt", PROMPT, "--out", str(out(name)), *lora_args(tmp_path),
                                     *extra])
    assert run("default.safetensors") == 0 and run("two.safetensors", "--guidance_scale", "2") == 0
    read = lambda name: safetensors_io.SafetensorsFile(out(name)).read("latents")
    assert np.abs(read("default.safetensors") - read("two.safetensors")).max() > 1e-4  # the scale is an input
    capsys.readouterr()
    assert run("five.safetensors", "--guidance_scale", "5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance_scale 5: the LoRAs' guidance embedding was trained for scales 2 to 4" in err[0]
    assert not out("five.safetensors").exists()
