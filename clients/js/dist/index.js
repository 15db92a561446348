export { ConversationError, GoimClient } from "./client.js";
export { decode, encode, Op, PacketError, HEADER_LEN, MAX_PACKET } from "./packet.js";
