"""lab-agent: the agent on every installed machine (issue 18). It enrolls with labd (a join token,
a key made here, a CSR, a short-lived certificate), keeps a mutually authenticated WebSocket to
labd's hub, sends heartbeats, runs commands and relays the journal. docs/agent.md."""

VERSION = "0.1.0"
