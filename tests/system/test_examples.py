"""The five examples of the README, as written, through pyepics and caproto-put/get."""

from __future__ import annotations

import epics
import numpy as np
import pytest

from tests.system.clients import get, get_array
from tests.system.conftest import caproto_cli, wait_for


@pytest.fixture
def ex(relay):
    """Example names made unique under the shared relay's prefix."""
    return lambda base: relay.name(*base.rsplit("_", 1))


def test_int_scalar(relay, ex):
    name = ex("cupsofcoffeetoday_i1")
    assert epics.caput(name, 2, wait=True, timeout=5) == 1
    assert get(name) == 2
    assert "long" in epics.PV(name).type


def test_float_scalar(relay, ex):
    name = ex("temperature_lab_f1")
    assert epics.caput(name, 21.2, wait=True, timeout=5) == 1
    assert get(name) == pytest.approx(21.2)


def test_float_array(relay, ex):
    name = ex("fit_results_f4")
    assert epics.caput(name, [23.0, 0.1, 3231.123, 1e-4], wait=True, timeout=5) == 1
    # Read at the current length: caget may use the count of the monitor event that
    # caput's channel got before the put (one element: the PV had no value yet).
    np.testing.assert_allclose(get_array(name), [23.0, 0.1, 3231.123, 1e-4])


def test_buffer_appends_right(relay, ex):
    name = ex("pressure_log_F100")
    # get_array, not caget: caget may ask for the element count of a monitor event
    # that lags behind the put.
    assert epics.caput(name, [1e-4], wait=True, timeout=5) == 1
    np.testing.assert_allclose(get_array(name), [1e-4])
    assert epics.caput(name, [2e-4, 3e-4], wait=True, timeout=5) == 1
    np.testing.assert_allclose(get_array(name), [1e-4, 2e-4, 3e-4])


def test_char_text(relay, ex):
    name = ex("cmdline_output_c10000")
    text = "The sun is shining, go outside!"
    assert epics.caput(name, text, wait=True, timeout=5) == 1
    assert get_array(name, as_string=True) == text


def test_caproto_put_appends_one_value_and_get_reads(relay, ex):
    name = ex("pressure_log_F100")
    r = caproto_cli("put", name, "1e-4")
    assert r.returncode == 0, r.stderr
    r = caproto_cli("put", name, "2e-4")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(get_array(name)) == 2, what="two appended values")
    np.testing.assert_allclose(get_array(name), [1e-4, 2e-4])
    r = caproto_cli("get", name)
    assert r.returncode == 0, r.stderr
    assert "0.0001" in r.stdout and "0.0002" in r.stdout


def test_caproto_text_round_trip(relay, ex):
    name = ex("cmdline_output_c10000")
    r = caproto_cli("put", "-S", name, "The sun is shining, go outside!")
    assert r.returncode == 0, r.stderr
    r = caproto_cli("get", "-S", name)
    assert r.returncode == 0, r.stderr
    assert "The sun is shining, go outside!" in r.stdout, r.stdout
