"""An error raised inside a Ray task reads as the error its code raised, in one line: Ray Data's "UDF failed to
process a data block" wrapper is unwrapped through the worker's traceback, which is all that crosses the
process boundary of the original."""

from __future__ import annotations

import traceback

import pytest
from ray.exceptions import RayTaskError, UserCodeException

from pipeline.stages.base import one_line


def worker_side_error() -> RayTaskError:
    """The exception a Ray Data map worker ships back: its traceback as text, the wrapper as cause."""
    try:
        try:
            raise ValueError("conversational rows need a chat template; set data.chat_template")
        except ValueError as inner:
            raise UserCodeException("UDF failed to process a data block.") from inner
    except UserCodeException as wrapper:
        text = "".join(traceback.format_exception(wrapper))
        return RayTaskError("MapWorker.submit", text, wrapper, proctitle="ray::MapWorker", pid=1, ip="10.0.0.1")


def test_a_udf_error_reads_as_the_error_its_code_raised():
    shipped = worker_side_error().as_instanceof_cause()  # what ray.get raises in the driver
    assert one_line(shipped) == "conversational rows need a chat template; set data.chat_template"
    # Ray Data raises its own wrapper in the driver, chained to the shipped error.
    with pytest.raises(UserCodeException) as driver_side:
        raise UserCodeException("UDF failed to process a data block.") from shipped
    assert one_line(driver_side.value) == "conversational rows need a chat template; set data.chat_template"


def test_an_error_of_our_own_and_a_plain_cause_are_as_before():
    assert one_line(ValueError("train.beta: 0; the dpo loss needs beta > 0")) == (
        "train.beta: 0; the dpo loss needs beta > 0"
    )
    assert one_line(KeyError("step")) == "KeyError: 'step'"
