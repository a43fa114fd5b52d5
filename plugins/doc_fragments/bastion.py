# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Connection options shared by the lab.platform modules (see module_utils/lab_client.py)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Base URL of the bastion, for example C(http://10.0.0.2:8080).
      - If not set, the environment variable E(LAB_BASTION_URL) is used.
    type: str
    required: true
  token:
    description:
      - Operator token of the bastion (the output of C(lab-bastion token)).
      - If not set, the environment variable E(LAB_BASTION_TOKEN) is used.
    type: str
  validate_certs:
    description:
      - Verify the bastion's TLS certificate when O(url) is C(https://).
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the bastion's answer.
    type: int
    default: 30
"""
