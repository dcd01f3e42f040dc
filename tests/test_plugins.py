"""Third-party plugins: a throwaway package registers a method through an entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PLUGIN = textwrap.dedent(
    '''
    """A throwaway method: sum fusion whose fused loss is weighted (an outside package)."""
    import torch.nn.functional as F

    from mmbalance.config import Option
    from mmbalance.method import Method
    from mmbalance.registry import register_method


    @register_method("toy-weighted-sum", "throwaway plugin method from an entry point")
    class ToyWeightedSum(Method):
        name = "toy-weighted-sum"
        fusion = "sum"
        options = {"fused_weight": Option(2.0, "weight of the fused CE")}

        def training_step(self, batch, batch_idx):
            out = self.model(batch)
            y = batch["label"]
            uni = sum(F.cross_entropy(u, y) for u in out.uni.values())
            self.log(uni=uni.detach())
            return self.cfg["fused_weight"] * F.cross_entropy(out.fused, y) + uni
    '''
)


def test_entry_point_plugin_registers_and_runs(tmp_path):
    pkg = tmp_path / "site" / "toyplugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    dist = tmp_path / "site" / "toyplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmbalance.methods]\ntoy = toyplugin\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mmbalance.cli", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    listed = cli("list", "methods")
    assert listed.returncode == 0 and "toy-weighted-sum" in listed.stdout
    assert "throwaway plugin method" in listed.stdout
    ran = cli("run", "--method", "toy-weighted-sum", "--dataset", "synthetic", "--epochs", "2",
              "--records", str(tmp_path / "runs"), "--set", "fused_weight=0.5", "--set", "n_train=300",
              "--set", "n_test=100")
    assert ran.returncode == 0, ran.stderr
    record = next((tmp_path / "runs").glob("*/record.jsonl")).read_text()
    assert '"fused_weight": 0.5' in record and '"uni"' in record
