"""The wheel carries the top-level `configs/` (Hydra's config groups) as `timemoe_train/configs`, so that an
installed `timemoe-train` runs without a checkout; the repository keeps its one copy at the top (everything else is
in pyproject.toml)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's configs/ in place
            self.copy_tree("configs", str(Path(self.build_lib) / "timemoe_train" / "configs"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
