"""server/heap.py in the app's life: start-up freezes the heap, reload collects the retired model, shutdown thaws."""

from __future__ import annotations

import asyncio
import gc
import weakref

from server.app import create_app
from server.heap import YOUNG_THRESHOLD


async def test_start_up_freezes_the_long_lived_heap_and_shutdown_thaws_it(make_settings):
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000  # the app, its model runtime, the libraries' objects
    assert gc.get_freeze_count() == 0


async def test_a_retired_model_is_collected_even_when_caught_in_a_frozen_cycle(make_settings):
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        services = app.state.services
        previous = services.runtime
        previous.cycle = previous  # refcounting alone can never free it now; frozen, no collection would
        retired = weakref.ref(previous)
        del previous
        assert (await services.reload())["reloaded"] is True
        for _ in range(100):
            if retired() is None:
                break
            await asyncio.sleep(0.05)
        assert retired() is None
        assert gc.get_freeze_count() > 10_000  # frozen again, with the new model in


async def test_the_server_collects_its_young_generation_less_often_and_shutdown_puts_the_threshold_back(
        make_settings):
    found = gc.get_threshold()
    gc.set_threshold(700, 9, 8)
    try:
        app = create_app(make_settings())
        async with app.router.lifespan_context(app):
            assert gc.get_threshold() == (YOUNG_THRESHOLD, 9, 8)
            assert (await app.state.services.reload())["reloaded"] is True  # refreezes: the threshold stays
            assert gc.get_threshold() == (YOUNG_THRESHOLD, 9, 8)
        assert gc.get_threshold() == (700, 9, 8)
        gc.set_threshold(0, 9, 8)  # the collector turned off by the process: left off
        app = create_app(make_settings())
        async with app.router.lifespan_context(app):
            assert gc.get_threshold() == (0, 9, 8)
        assert gc.get_threshold() == (0, 9, 8)
    finally:
        gc.set_threshold(*found)
