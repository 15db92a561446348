export declare const HEADER_LEN = 16;
/** goim clients refuse packets larger than this (header included). */
export declare const MAX_PACKET: number;
export declare const Op: {
    readonly Heartbeat: 2;
    readonly HeartbeatReply: 3;
    readonly SendMsg: 4;
    readonly SendMsgReply: 5;
    readonly DisconnectReply: 6;
    readonly Auth: 7;
    readonly AuthReply: 8;
    readonly Raw: 9;
    readonly ChangeRoom: 12;
    readonly ChangeRoomReply: 13;
    readonly Sub: 14;
    readonly SubReply: 15;
    readonly Unsub: 16;
    readonly UnsubReply: 17;
    readonly Hello: 20;
    readonly HelloReply: 21;
    readonly Reconnect: 22;
    readonly Position: 23;
    readonly Join: 24;
    readonly JoinReply: 25;
    readonly Recover: 26;
    readonly RecoverReply: 27;
    readonly Ack: 28;
    readonly Kicked: 29;
    readonly Refresh: 30;
    readonly RefreshReply: 31;
    readonly TokenExpiring: 32;
    readonly RoomJoin: 33;
    readonly RoomJoinReply: 34;
    readonly RoomLeave: 35;
    readonly RoomLeaveReply: 36;
    readonly ConvSend: 37;
    readonly ConvSendReply: 38;
    readonly ConvRead: 39;
    readonly ConvReadReply: 40;
    readonly ConvMessage: 41;
    readonly ConvReadSync: 42;
    readonly ConvHistory: 43;
    readonly ConvHistoryReply: 44;
    readonly ConvList: 45;
    readonly ConvListReply: 46;
};
export interface Packet {
    ver: number;
    op: number;
    seq: number;
    body: Uint8Array;
}
/** A frame that is not goim's packet layout. */
export declare class PacketError extends Error {
}
/** One packet as bytes. A string body is sent as UTF-8. */
export declare function encode(op: number, body?: Uint8Array | string, seq?: number, ver?: number): Uint8Array;
/**
 * The packets in one WebSocket frame, raw batches (op 9) unpacked in order. Throws
 * `PacketError` on a length that does not fit, never reads past the frame.
 */
export declare function decode(frame: Uint8Array): Packet[];
