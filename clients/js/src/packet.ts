// goim's packet: a 16-byte big-endian header (packet length, header length, version, op,
// sequence) and a body. Over WebSocket each binary frame holds one packet; op 9 (raw) holds
// a batch of packets back to back in its body.

export const HEADER_LEN = 16;
/** goim clients refuse packets larger than this (header included). */
export const MAX_PACKET = 4096 + HEADER_LEN;

export const Op = {
  Heartbeat: 2,
  HeartbeatReply: 3,
  SendMsg: 4,
  SendMsgReply: 5,
  DisconnectReply: 6,
  Auth: 7,
  AuthReply: 8,
  Raw: 9,
  ChangeRoom: 12,
  ChangeRoomReply: 13,
  Sub: 14,
  SubReply: 15,
  Unsub: 16,
  UnsubReply: 17,
  // goim-rs extensions (docs/PROTOCOL.md), used only after HELLO.
  Hello: 20,
  HelloReply: 21,
  Reconnect: 22,
  Position: 23,
  Join: 24,
  JoinReply: 25,
  Recover: 26,
  RecoverReply: 27,
  Ack: 28,
  Kicked: 29,
  Refresh: 30,
  RefreshReply: 31,
  TokenExpiring: 32,
  RoomJoin: 33,
  RoomJoinReply: 34,
  RoomLeave: 35,
  RoomLeaveReply: 36,
  // Conversations (docs/PROTOCOL.md): answered on request op + 1, no HELLO needed.
  ConvSend: 37,
  ConvSendReply: 38,
  ConvRead: 39,
  ConvReadReply: 40,
  ConvMessage: 41,
  ConvReadSync: 42,
  ConvHistory: 43,
  ConvHistoryReply: 44,
  ConvList: 45,
  ConvListReply: 46,
} as const;

export interface Packet {
  ver: number;
  op: number;
  seq: number;
  body: Uint8Array;
}

/** A frame that is not goim's packet layout. */
export class PacketError extends Error {}

const utf8 = new TextEncoder();

/** One packet as bytes. A string body is sent as UTF-8. */
export function encode(op: number, body: Uint8Array | string = new Uint8Array(0), seq = 0, ver = 1): Uint8Array {
  const b = typeof body === "string" ? utf8.encode(body) : body;
  const out = new Uint8Array(HEADER_LEN + b.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, out.length);
  v.setUint16(4, HEADER_LEN);
  v.setUint16(6, ver);
  v.setUint32(8, op);
  v.setUint32(12, seq);
  out.set(b, HEADER_LEN);
  return out;
}

/**
 * The packets in one WebSocket frame, raw batches (op 9) unpacked in order. Throws
 * `PacketError` on a length that does not fit, never reads past the frame.
 */
export function decode(frame: Uint8Array): Packet[] {
  const out: Packet[] = [];
  unpack(frame, out, 0);
  return out;
}

function unpack(buf: Uint8Array, out: Packet[], depth: number): void {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let at = 0;
  while (at < buf.length) {
    if (buf.length - at < HEADER_LEN) {
      throw new PacketError(`truncated header: ${buf.length - at} bytes`);
    }
    const packLen = v.getUint32(at);
    const headerLen = v.getUint16(at + 4);
    if (headerLen < HEADER_LEN || packLen < headerLen || packLen > buf.length - at) {
      throw new PacketError(`bad lengths: packet ${packLen}, header ${headerLen}, ${buf.length - at} bytes left`);
    }
    const p: Packet = {
      ver: v.getUint16(at + 6),
      op: v.getUint32(at + 8),
      seq: v.getUint32(at + 12),
      body: buf.subarray(at + headerLen, at + packLen),
    };
    // A raw batch holds packets, never batches: one level only.
    if (p.op === Op.Raw && depth === 0) {
      unpack(p.body, out, 1);
    } else {
      out.push(p);
    }
    at += packLen;
  }
}
