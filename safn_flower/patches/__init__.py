"""Every change safn makes to private Flower 1.42 code, one module per process that makes it,
each patch carrying its own check and apply (`core`), checked before it is applied, announced in
one line, restorable, and tested against the installed Flower (tests/test_flower_patches.py).

- `serverapp.prepare(grid, poll_interval)`: the coordinator's ServerApp (deployed);
- `supernode.prepare(...)`: a site's SuperNode (`safn.client.supernode`);
- `superexec.prepare(...)`: a site's warm SuperExec (`safn.client.superexec`);
- `simulation.prepare(...)`: the simulation driver (`safn.simulations.engine`);
- `log_wording.check_superlink_log()` / `check_supernode_log()`: the Flower log lines safn-server
  and safn-client read, checked like patches when they start.

docs/flower-patches.md lists them, what each is for, what it measured, the Flower API it would
need upstream, and the public seams used instead of former patches.
"""

from safn_flower.patches.core import FlowerPatchError  # noqa: F401

