/**
 * Open connections, in all and by client address, from the moment they are accepted until they
 * close: what bounds a listener against one address taking every slot, or a crowd of
 * half-open TLS handshakes holding file descriptors. Shared by the SMTP ports and POP3.
 */
export class ConnectionSlots {
  private readonly max: number;
  private readonly maxPerIp: number;
  private readonly exempt: ReadonlySet<string>;
  private open = 0;
  private readonly perIp = new Map<string, number>();

  /** `max` bounds all connections (Infinity: another layer does); `exempt` addresses are not counted per address. */
  constructor(options: { max?: number; maxPerIp: number; exempt?: readonly string[] }) {
    this.max = options.max ?? Infinity;
    this.maxPerIp = options.maxPerIp;
    this.exempt = new Set(options.exempt ?? []);
  }

  /**
   * Counts a new connection from `ip`; the returned function (to call once it is gone; calling it
   * again does nothing) gives its slot back. null, nothing counted, when a limit is reached.
   */
  admit(ip: string): (() => void) | null {
    const perIp = !this.exempt.has(ip);
    const fromIp = perIp ? (this.perIp.get(ip) ?? 0) : 0;
    if (this.open >= this.max || (perIp && fromIp >= this.maxPerIp)) return null;
    this.open++;
    if (perIp) this.perIp.set(ip, fromIp + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.open--;
      if (!perIp) return;
      const left = (this.perIp.get(ip) ?? 1) - 1;
      if (left > 0) this.perIp.set(ip, left);
      else this.perIp.delete(ip);
    };
  }
}
