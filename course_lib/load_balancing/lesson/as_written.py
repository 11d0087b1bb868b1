"""The load balancers of the seed module (section "Load Balancing"), as written.

Kept faithful on purpose so the notebook can run them and show where they break: round
robin keeps a global counter that it reads and writes without a lock; least connections
never increments its counters (only ``release`` decrements them), so ``min`` always
returns the first server. No adaptation was needed: ``servers`` and ``current`` are module
globals, as in the module, so a notebook sets them before a run.
"""

servers = ["server1", "server2", "server3"]
current = 0


def get_server():
    global current
    server = servers[current]
    current = (current + 1) % len(servers)
    return server


# Request 1 → server1
# Request 2 → server2
# Request 3 → server3
# Request 4 → server1 (volta ao início)


class LoadBalancer:
    def __init__(self):
        self.servers = {
            "server1": 0,  # conexões ativas
            "server2": 0,
            "server3": 0,
        }

    def get_server(self):
        # Retorna servidor com menos conexões
        return min(self.servers, key=self.servers.get)

    def release(self, server):
        self.servers[server] -= 1
