"""SpiceSampler on its own: seeded order, cycling, switches, state round trip."""

import json

from spice_trainer import SpiceSampler


def test_sampler_standalone_order_is_seeded_and_cycles():
    sampler = SpiceSampler([5, 6, 7], seed=0, num_samples=5)
    first = list(sampler)
    assert len(first) == 5 and set(first) == {5, 6, 7}
    assert first[3:] == first[:2]  # 5 draws from 3 rows: the permutation cycles
    assert first == list(SpiceSampler([5, 6, 7], seed=0, num_samples=5))
    sampler.set_epoch(1)
    assert sorted(list(sampler)[:3]) == [5, 6, 7]
    restored = SpiceSampler.from_state_dict(json.loads(json.dumps(sampler.state_dict())))
    restored.set_epoch(1)
    assert list(restored) == list(sampler)
