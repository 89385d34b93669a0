"""fsmoe.environ: variables set for a block and restored after, also after an error."""
import os

import pytest

from fsmoe.environ import patched_environ


def test_patched_environ_sets_unsets_and_restores(monkeypatch):
    monkeypatch.setenv("FSMOE_T_KEPT", "old")
    monkeypatch.delenv("FSMOE_T_NEW", raising=False)
    with pytest.raises(RuntimeError), patched_environ({"FSMOE_T_KEPT": None, "FSMOE_T_NEW": "1"}):
        assert "FSMOE_T_KEPT" not in os.environ and os.environ["FSMOE_T_NEW"] == "1"
        raise RuntimeError
    assert os.environ["FSMOE_T_KEPT"] == "old" and "FSMOE_T_NEW" not in os.environ
