"""Stand-in for ansible-test's pip bootstrap script (get-pip.py).

ansible-test downloads get-pip.py from ci-files.testing.ansible.com, which is not a package registry
and is not reachable here. This script does the same job with what Python ships: `ensurepip` puts
the bundled pip into the (empty) virtual environment, then pip installs the requested packages from
the package index. test_sanity.py copies it to ansible-test's cache path when that file is missing.
Arguments are get-pip.py's: pip options and requirements, plus --no-setuptools / --no-wheel.
"""

import ensurepip
import os
import subprocess
import sys

env = dict(os.environ)  # ensurepip sets PIP_CONFIG_FILE=/dev/null in os.environ; pip install needs the config
ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args], env=env))
