"""Flow-matching schedules: diffusers' FlowMatchEulerDiscreteScheduler, and the Glance slow/fast split.

Everything here is host-side numpy, computed once per resolution and step
count; the sampler receives the results as arrays, so changing them never
recompiles anything. Arithmetic follows diffusers' dtypes (float32 arrays,
Python-float shift parameters) so that sigmas and timesteps agree with it to
float32 rounding.
"""

import dataclasses
import math

import ml_dtypes
import numpy as np

from glance_jax.errors import GlanceError

# The official Glance phases: 1-based step indices of each model's 50-step schedule.
OFFICIAL_SLOW_STEPS = (1, 3, 5, 7, 9)
OFFICIAL_FAST_STEPS = (11, 21, 31, 41, 50)


class FlowMatchEulerScheduler:
    """Sigmas and timesteps of diffusers' FlowMatchEulerDiscreteScheduler, as its pipelines call it."""

    def __init__(self, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift_terminal=None,
                 time_shift_type="exponential"):
        if time_shift_type not in ("exponential", "linear"):
            raise GlanceError(f"unknown time_shift_type {time_shift_type!r}")
        self.num_train_timesteps = num_train_timesteps
        self.shift, self.use_dynamic_shifting = shift, use_dynamic_shifting
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.shift_terminal, self.time_shift_type = shift_terminal, time_shift_type

    @classmethod
    def from_config(cls, config):
        """From a diffusers scheduler_config.json dict; options this scheduler does not implement are refused."""
        config = dict(config)
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling"):
            if config.pop(flag, False):
                raise GlanceError(f"scheduler option {flag}=True is not supported")
        names = {"num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                 "base_image_seq_len", "max_image_seq_len", "shift_terminal", "time_shift_type"}
        values = {k: v for k, v in config.items() if k in names and v is not None}
        _check_values(values)
        return cls(**values)

    def mu(self, image_seq_len):
        """The pipelines' `calculate_shift`: linear in the image sequence length between the two anchors."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def shifted(self, sigmas, image_seq_len=None):
        """Applies the time shift (and the terminal stretch) to unshifted float32 sigmas."""
        sigmas = np.asarray(sigmas, np.float32)
        if self.use_dynamic_shifting:
            if image_seq_len is None:
                raise GlanceError("this scheduler shifts by resolution: pass image_seq_len")
            mu = self.mu(image_seq_len)
            if self.time_shift_type == "exponential":
                shift = math.exp(min(mu, 709.0))  # (a Python float holds exp(709); float32 overflows before)
                with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused below
                    sigmas = shift / (shift + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if self.shift_terminal:
            if len(sigmas) < 2:
                raise GlanceError("a schedule with shift_terminal needs at least 2 steps")
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        sigmas = np.asarray(sigmas, np.float32)
        if not np.isfinite(sigmas).all():
            raise GlanceError(f"the scheduler's time shift is not finite at image_seq_len={image_seq_len} (mu="
                              f"{self.mu(image_seq_len) if self.use_dynamic_shifting else self.shift:g}): this "
                              "size is far beyond what the scheduler was made for; sample a smaller size")
        return sigmas

    def set_timesteps(self, num_inference_steps, image_seq_len=None, sigmas=None):
        """(timesteps, sigmas): N timesteps (1000 x sigma) and N + 1 sigmas ending with the terminal 0.

        Unshifted sigmas default to `linspace(1, 1/N, N)`, as the FLUX and Qwen-Image pipelines pass them.
        """
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        elif len(sigmas) != num_inference_steps:
            raise GlanceError(f"{len(sigmas)} sigmas given for {num_inference_steps} steps")
        sigmas = self.shifted(np.asarray(sigmas).astype(np.float32), image_seq_len)
        timesteps = sigmas * np.float32(self.num_train_timesteps)
        return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


def _check_values(values):
    """Refuses scheduler config values of the wrong type or range (also a zero-width shift interpolation)."""
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
    number = lambda v: (integer(v) or isinstance(v, float)) and math.isfinite(v)
    rules = {"num_train_timesteps": (lambda v: integer(v) and v > 0, "a positive integer"),
             "shift": (lambda v: number(v) and v > 0, "a finite number > 0"),
             "use_dynamic_shifting": (lambda v: isinstance(v, bool), "true or false"),
             "base_shift": (number, "a finite number"), "max_shift": (number, "a finite number"),
             "base_image_seq_len": (lambda v: integer(v) and v > 0, "a positive integer"),
             "max_image_seq_len": (lambda v: integer(v) and v > 0, "a positive integer"),
             "shift_terminal": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
             "time_shift_type": (lambda v: v in ("exponential", "linear"), "'exponential' or 'linear'")}
    for key, value in values.items():
        ok, wanted = rules[key]
        if not ok(value):
            raise GlanceError(f"scheduler config {key}={value!r}: must be {wanted}")
    if values.get("use_dynamic_shifting") and values.get("base_image_seq_len", 256) == values.get(
            "max_image_seq_len", 4096):
        raise GlanceError("scheduler config: base_image_seq_len equals max_image_seq_len, so the resolution "
                          "shift divides by zero")


def base_schedule(scheduler, steps, image_seq_len):
    """(timesteps, sigmas) of the base's own `steps`-step schedule at this resolution (`scheduler`: a config
    dict or a family name)."""
    return FlowMatchEulerScheduler.from_config(scheduler).set_timesteps(steps, image_seq_len)


def snr(sigma):
    """Signal-to-noise ratio of x_t = (1 - sigma) x0 + sigma noise: ((1 - sigma) / sigma)^2."""
    sigma = np.asarray(sigma, np.float64)
    return ((1 - sigma) / sigma) ** 2


@dataclasses.dataclass(frozen=True)
class GlanceSchedule:
    """The slow and fast timesteps of a Glance sampler, and how they were chosen.

    `slow` and `fast` are timesteps in [0, 1000] (the model is conditioned on
    t / 1000). A schedule chosen by step index on a base grid records that grid
    (`scheduler`, `base_steps`, `image_seq_len`, the indices): the sampler
    recomputes it for another resolution with `for_image_seq_len`. A schedule
    given as raw timesteps has `image_seq_len=None` and is used as given.
    """

    slow: tuple
    fast: tuple
    scheduler: dict | None = None
    image_seq_len: int | None = None
    base_steps: int = 50
    slow_steps: tuple | None = None
    fast_steps: tuple | None = None
    round_bf16: bool = False

    @property
    def boundary(self):
        """The timestep where the fast phase begins."""
        return self.fast[0]

    @property
    def num_steps(self):
        return len(self.slow) + len(self.fast)

    def sigmas(self):
        """The points the consistent sampler steps through and the trainer trains at: every slow and fast
        timestep / 1000, then the terminal 0 (float32, as the sampler's arrays)."""
        return np.float32(list(self.slow) + list(self.fast) + [0.0]) / np.float32(1000)

    @classmethod
    def from_steps(cls, scheduler, slow_steps, fast_steps, image_seq_len, base_steps=50, round_bf16=False):
        """Slow and fast steps picked by 1-based index on the `base_steps`-step schedule at this resolution."""
        steps = list(slow_steps) + list(fast_steps)
        if not steps or min(steps) < 1 or max(steps) > base_steps or steps != sorted(set(steps)):
            raise GlanceError(f"Glance steps must be increasing indices in 1..{base_steps}, got {steps}")
        timesteps, _ = base_schedule(scheduler, base_steps, image_seq_len)
        pick = lambda idx: timesteps[np.asarray(idx, int) - 1]
        slow, fast = pick(slow_steps), pick(fast_steps)
        if round_bf16:
            slow, fast = (x.astype(ml_dtypes.bfloat16).astype(np.float32) for x in (slow, fast))
        return cls(tuple(map(float, slow)), tuple(map(float, fast)), dict(scheduler), image_seq_len, base_steps,
                   tuple(slow_steps), tuple(fast_steps), round_bf16)

    @classmethod
    def official(cls, scheduler, image_seq_len=4096, round_bf16=False):
        """The official phases (steps 1, 3, 5, 7, 9 | 11, 21, 31, 41, 50 of 50) of a model's scheduler config.

        `round_bf16=True` rounds the timesteps to bfloat16 as the official code
        stores them (Qwen-Image: 1000, 980, 956, 936, 912 | 888, 744, 564, 320, 20).
        """
        return cls.from_steps(scheduler, OFFICIAL_SLOW_STEPS, OFFICIAL_FAST_STEPS, image_seq_len, round_bf16=round_bf16)

    @classmethod
    def from_timesteps(cls, slow, fast):
        """Raw timesteps in [0, 1000], decreasing; used as given at every resolution."""
        steps = list(slow) + list(fast)
        if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[0] > 1000 or steps[-1] <= 0:
            raise GlanceError(f"Glance timesteps must decrease within (0, 1000], got {steps}")
        return cls(tuple(map(float, slow)), tuple(map(float, fast)))

    @classmethod
    def from_snr(cls, scheduler, num_slow, num_fast, snr_threshold, image_seq_len, base_steps=50):
        """Phases split where SNR(sigma) first reaches `snr_threshold` on the base grid.

        The boundary b is the first base step whose sigma has SNR >= threshold;
        slow steps are `num_slow` evenly spaced indices in 1..b-1 and fast steps
        `num_fast` evenly spaced in b..base_steps (rounded half up).
        """
        _, sigmas = base_schedule(scheduler, base_steps, image_seq_len)
        above = np.nonzero(snr(sigmas[:base_steps]) >= snr_threshold)[0]
        if len(above) == 0 or above[0] < num_slow or base_steps - above[0] < num_fast:
            raise GlanceError(f"SNR threshold {snr_threshold} leaves no room for {num_slow} slow and {num_fast} "
                              f"fast steps on a {base_steps}-step grid")
        boundary = int(above[0]) + 1  # 1-based
        spread = lambda lo, hi, n: [int(math.floor(x + 0.5)) for x in np.linspace(lo, hi, n)]
        return cls.from_steps(scheduler, spread(1, boundary - 1, num_slow), spread(boundary, base_steps, num_fast),
                              image_seq_len, base_steps)

    @classmethod
    def uniform(cls, scheduler, num_slow, num_fast, image_seq_len):
        """The base's own (num_slow + num_fast)-step schedule at this resolution, first num_slow steps slow."""
        k = num_slow + num_fast
        if num_slow < 1 or num_fast < 1:
            raise GlanceError(f"a Glance schedule needs a slow and a fast step at least, got {num_slow}, {num_fast}")
        return cls.from_steps(scheduler, range(1, num_slow + 1), range(num_slow + 1, k + 1), image_seq_len, k)

    @classmethod
    def fitted(cls, scheduler, states, num_slow, num_fast, image_seq_len, base_steps=50, split="half"):
        """K = num_slow + num_fast timesteps of the base's `base_steps`-step grid fitted to its trajectories.

        `states` (M, base_steps + 1, ...) are M teacher trajectories integrated
        with Euler steps on that grid (the last state at sigma 0). Dynamic
        programming picks the K jumps from sigma 1 to 0 whose summed one-step
        Euler error (`jump_errors`) is smallest: the approach of Chen et al.
        2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling".
        `split`: "half" (first num_slow of the K steps slow) or an SNR
        threshold (float): steps with SNR below it are slow (at least one each).
        """
        _, sigmas = base_schedule(scheduler, base_steps, image_seq_len)
        states = np.asarray(states)
        if states.shape[1] != base_steps + 1:
            raise GlanceError(f"trajectories have {states.shape[1]} states, the {base_steps}-step grid "
                              f"{base_steps + 1}")
        k = num_slow + num_fast
        chosen = best_jumps(jump_errors(states, sigmas), k)[:-1]  # grid indices of the K steps (0-based)
        steps = [int(i) + 1 for i in chosen]
        if split != "half":
            slow = int(np.sum(snr(sigmas[chosen]) < float(split)))
            num_slow = min(max(slow, 1), k - 1)
        return cls.from_steps(scheduler, steps[:num_slow], steps[num_slow:], image_seq_len, base_steps)

    def to_dict(self):
        """A JSON-ready description that `from_dict` turns back into this schedule (LoRA files carry it)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d):
        """The schedule `to_dict` described; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
            schedule = cls(**values)
            cls.from_timesteps(schedule.slow, schedule.fast)  # the same checks as any given schedule
        except (TypeError, AttributeError):
            raise GlanceError(f"not a Glance schedule description: {d!r}") from None
        return schedule

    def for_image_seq_len(self, image_seq_len):
        """This schedule at another resolution: recomputed from its step indices, or itself if resolution-free."""
        if self.image_seq_len is None or self.image_seq_len == image_seq_len:
            return self
        return GlanceSchedule.from_steps(self.scheduler, self.slow_steps, self.fast_steps, image_seq_len,
                                         self.base_steps, self.round_bf16)


def jump_errors(states, sigmas):
    """errors[i, j] (i < j): the RMS error of one Euler step from grid point i straight to point j.

    `states` (M, N + 1, ...) are trajectories integrated with Euler steps on
    the grid `sigmas` (N + 1, ending at 0), so the velocity at point i is the
    difference quotient of its neighbours. One step from i lands at
    `x_i + (sigma_j - sigma_i) v_i`; the error is its distance to x_j,
    root-mean-square over elements, averaged over trajectories.
    """
    x = np.asarray(states, np.float64).reshape(states.shape[0], states.shape[1], -1)
    s = np.asarray(sigmas, np.float64)
    n = len(s)
    v = (x[:, 1:] - x[:, :-1]) / (s[1:] - s[:-1])[None, :, None]
    errors = np.full((n, n), np.inf)
    for i in range(n - 1):
        jump = x[:, i:i + 1] + (s[i + 1:] - s[i])[None, :, None] * v[:, i:i + 1]
        errors[i, i + 1:] = np.sqrt(np.mean(np.square(jump - x[:, i + 1:]), axis=-1)).mean(0)
    return errors


def best_jumps(errors, k):
    """Grid indices 0 = p_0 < ... < p_k = N minimising sum errors[p_i, p_i+1] (dynamic programming, O(k N^2))."""
    n = errors.shape[0]
    if not 1 <= k <= n - 1:
        raise GlanceError(f"cannot choose {k} steps on a grid of {n - 1}")
    cost = np.full((k + 1, n), np.inf)  # cost[m, j]: the best m jumps from point 0 to point j
    back = np.zeros((k + 1, n), int)
    cost[0, 0] = 0.0
    for m in range(1, k + 1):
        total = cost[m - 1][:, None] + errors  # [i, j]: m - 1 jumps to i, then i -> j
        back[m] = np.argmin(total, axis=0)
        cost[m] = total[back[m], np.arange(n)]
    path = [n - 1]
    for m in range(k, 0, -1):
        path.append(int(back[m, path[-1]]))
    return path[::-1]
