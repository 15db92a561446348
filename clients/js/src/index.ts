export { ConversationError, GoimClient } from "./client.js";
export type {
  ClientOptions,
  ConversationMessage,
  ConversationSummary,
  Events,
  Message,
  Position,
} from "./client.js";
export { decode, encode, Op, PacketError, HEADER_LEN, MAX_PACKET } from "./packet.js";
export type { Packet } from "./packet.js";
