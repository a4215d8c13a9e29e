"""launch/hostfile.example, read by the DeepSpeed launcher's own hostfile parser."""

from deepspeed.launcher.runner import fetch_hostfile
from launching import REPO_ROOT


def test_the_example_hostfile_lists_two_nodes_of_eight_slots():
    resources = fetch_hostfile(str(REPO_ROOT / "launch" / "hostfile.example"))
    assert list(resources.items()) == [("gpu-node-01", 8), ("gpu-node-02", 8)]
