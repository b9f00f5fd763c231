"""`hydra/sweeper: tune` (conf/hydra/sweeper/tune.yaml) names this class; the code is midpo_cli/sweeps/tune.py.
Hydra instantiates sweepers only from classes defined in the hydra_plugins namespace, hence this subclass."""
try:
    from midpo_cli.sweeps import tune
except ImportError as e:                      # hydra-optuna-sweeper missing: say how to get it, when it is used
    from hydra.plugins.sweeper import Sweeper

    _missing = str(e)

    class TuneSweeper(Sweeper):
        def __init__(self, **kwargs):
            raise ImportError(f"+experiment=tune needs Hydra's Optuna sweeper: pip install 'midpo[sweep]' ({_missing})")

        def setup(self, **kwargs):
            pass

        def sweep(self, arguments):
            pass
else:
    class TuneSweeper(tune.TuneSweeper):
        __doc__ = tune.TuneSweeper.__doc__
