"""Work enqueued for later is delivered when it becomes available, without another submit."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

import turnbuckle
from turnbuckle.testing import ScriptedModel


@pytest.mark.parametrize("adapter", ["memory", "sqlite"])
async def test_delayed_work_is_delivered_when_due(tmp_path: Path, adapter: str) -> None:
    url = "memory://" if adapter == "memory" else f"sqlite:///{tmp_path}/delayed.db"
    model = ScriptedModel(then="later, as planned")
    async with turnbuckle.open_store(url) as store:
        async with turnbuckle.open_runtime(store, model=model) as runtime:
            due = time.time_ns() // 1_000_000 + 300
            await runtime.submit("s", "remind me", available_at_ms=due)
            assert runtime.active_sessions == ["s"]
            with anyio.fail_after(20):  # a hang guard, not a timing assertion
                await runtime.wait_idle()
        assert await store.sessions.list_queued_work("s") == []
        read = await store.sessions.bind("s").load()
        assert read is not None and read.head_revision == 1
        assert model.calls == 1
