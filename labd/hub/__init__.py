"""labd's hub: the WebSocket server bastions and agents dial (labd/hub/core.py), one handler per
peer kind (labd/hub/bastion.py; labd/hub/agent.py)."""
