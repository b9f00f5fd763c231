"""midpo's Hydra plugin: the sweeper of `+experiment=tune` (midpo_cli/sweeps/tune.py).

Hydra takes plugins only from the hydra_plugins namespace and finds them by scanning it; an editable install
(`pip install -e .`) hides this folder from that scan, so midpo_cli.sweeps.resources.RegisterPlugins also registers it.
"""
