"""The one build step pyproject.toml cannot express: the lab.platform collection (the repository root
is the collection) ships inside the wheel as labctl/collection/ansible_collections/lab/platform, so
an installed labctl finds its playbooks and roles without a checkout (labctl.runner.BUNDLED)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: what an installed collection needs at run time (galaxy.yml's build_ignore leaves the same, minus docs)
COLLECTION = ("galaxy.yml", "meta", "plugins", "roles", "playbooks", "inventory")
HERE = Path(__file__).resolve().parent


class BuildPyWithCollection(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install runs from the checkout
            return
        dest = Path(self.build_lib, "labctl", "collection", "ansible_collections", "lab", "platform")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in COLLECTION:
            src = HERE / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, dest / name)


setup(cmdclass={"build_py": BuildPyWithCollection})
