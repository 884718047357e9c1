import type net from "node:net";

/**
 * Open TCP connections of both listeners, in all and by client address, counted from the
 * moment they are accepted to the moment they close: a connection on 995 still in its TLS
 * handshake holds a file descriptor and a slot like any other, or a client that never sends a
 * ClientHello could open sockets without bound (and one address could take every slot).
 */
export class Admission {
  private readonly max: number;
  private readonly maxPerIp: number;
  private open = 0;
  private readonly perIp = new Map<string, number>();

  constructor(max: number, maxPerIp: number) {
    this.max = max;
    this.maxPerIp = maxPerIp;
  }

  /**
   * Counts a new connection; the returned function (to call once it is gone; calling it again
   * does nothing) gives its slot back. null, nothing counted, when a limit is reached.
   */
  admit(socket: net.Socket): (() => void) | null {
    const ip = socket.remoteAddress ?? "";
    const fromIp = this.perIp.get(ip) ?? 0;
    if (this.open >= this.max || fromIp >= this.maxPerIp) return null;
    this.open++;
    this.perIp.set(ip, fromIp + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.open--;
      const left = (this.perIp.get(ip) ?? 1) - 1;
      if (left > 0) this.perIp.set(ip, left);
      else this.perIp.delete(ip);
    };
  }
}
