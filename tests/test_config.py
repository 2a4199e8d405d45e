"""dni_tf.harness.config: one dataclass declares a study's settings, its flags and their checks."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import pytest
from absl import flags

from dni_tf.errors import UsageError
from dni_tf.harness.config import check_fields, define_flags, from_flags, grid_from_flags, option


@dataclasses.dataclass
class Toy:
    rates: Sequence[float] = option((0.1, 0.01), "One run per rate.", low=0.0, low_open=True)
    steps: int = option(10, "Steps.", low=1)
    keep: float = option(0.5, "Keep probability.", low=0.0, high=1.0)
    method: str = option("dni", "Method; several = grid.", choices=("bptt", "dni"), grid=True)
    points: Optional[Sequence[int]] = option(None, "'all' or indices.", low=1, none_text="all")
    extra: Sequence[str] = option((), "Optional names.", choices=("a", "b"), allow_empty=True)
    fast: bool = option(False, "Go fast.")
    data_dir: Optional[str] = option(None, "Where the data is.")

    def validate(self):
        check_fields(self)
        if self.points is not None and max(self.points) >= self.steps:
            raise ValueError(f"points={self.points}: must be < steps ({self.steps})")
        if self.fast and self.method == "bptt":
            raise ValueError("fast: needs --method=dni")


def parsed(*argv):
    values = flags.FlagValues()
    define_flags(Toy, flag_values=values)
    values(["prog", *argv])
    return values


def test_flags_parse_into_the_config_types():
    values = parsed("--rates=0.5,1e-3", "--steps=7", "--method=dni,bptt", "--points=1,2",
                    "--data_dir=/d")
    config = from_flags(Toy, values)
    assert config == Toy(rates=(0.5, 1e-3), steps=7, keep=0.5, method="dni", points=(1, 2),
                         extra=(), fast=False, data_dir="/d")
    assert grid_from_flags(Toy, values) == {"method": ["dni", "bptt"]}
    assert from_flags(Toy, parsed("--points=all")).points is None
    assert from_flags(Toy, parsed()) == Toy()


@pytest.mark.parametrize("argv, message", [
    (["--rates=0.5,0"], "--rates=0.0 is out of range: allowed (0, inf)"),
    (["--rates=0.5,nan"], "--rates=nan is not a finite number"),
    (["--rates=1e-3,0.001"], "--rates: 1e-3 and 0.001 are the same value"),
    (["--rates=x"], "--rates: 'x' is not a number"),
    (["--rates="], "--rates: give at least one value"),
    (["--steps=0"], "--steps=0 is out of range: allowed [1, inf)"),
    (["--keep=1.5"], "--keep=1.5 is out of range: allowed [0, 1]"),
    (["--keep=nan"], "--keep=nan is not a finite number: allowed [0, 1]"),
    (["--method=sgd"], "--method='sgd' is not allowed: choose from bptt, dni"),
    (["--method=dni,dni"], "--method: 'dni' is given more than once"),
    (["--extra=c"], "--extra='c' is not allowed"),
])
def test_a_bad_value_is_refused_while_flags_are_parsed(argv, message):
    with pytest.raises(flags.IllegalFlagValueError) as raised:
        parsed(*argv)
    assert message in str(raised.value)


def test_checks_across_fields_run_for_every_grid_combination():
    with pytest.raises(UsageError, match=r"^--points=\(1, 9\): must be < steps \(7\)$"):
        from_flags(Toy, parsed("--steps=7", "--points=1,9"))
    assert from_flags(Toy, parsed("--method=dni", "--fast")).fast
    with pytest.raises(UsageError, match="^--fast: needs --method=dni$"):
        from_flags(Toy, parsed("--method=dni,bptt", "--fast"))  # the first run alone is fine


def test_a_preset_fills_in_what_the_command_line_does_not_give():
    preset = {"steps": 20, "method": ("bptt", "dni"), "rates": (0.3,)}
    values = parsed("--steps=30")
    config = from_flags(Toy, values, preset=preset)
    assert (config.steps, config.rates, config.method) == (30, (0.3,), "bptt")
    assert grid_from_flags(Toy, values, preset=preset) == {"method": ["bptt", "dni"]}
    with pytest.raises(UsageError, match="--rates=-1.0 is out of range"):
        from_flags(Toy, parsed(), preset={"rates": (-1.0,)})  # presets are checked too


def test_a_config_built_by_hand_gets_the_same_checks():
    Toy(rates=(0.2,)).validate()
    for bad, message in ((dict(keep=2.0), "--keep=2.0 is out of range"),
                         (dict(steps=2.5), "--steps=2.5 is not an integer"),
                         (dict(rates=("0.1",)), "--rates='0.1' is not a number"),
                         (dict(rates=(0.1, 0.1)), "--rates: 0.1 is given more than once"),
                         (dict(method="rtrl"), "--method='rtrl' is not allowed")):
        with pytest.raises(UsageError, match=message):
            Toy(**bad).validate()
