"""The node agent (DESIGN §4, §5): heartbeats over MQTT with a Last Will, and self-fencing.

`agent.Agent` publishes; `fence` decides when this node must fence itself and runs the action.
It talks to the broker only; the Kubernetes API reaches it as an injected probe (runtime wires
it), because this layer may not import the Kubernetes client.
"""
