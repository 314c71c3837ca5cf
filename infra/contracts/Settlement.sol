// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Settlement
/// @notice Anchors Merkle roots of batches of verified inference results. Each root commits to
///         a batch of settlement records (OpenZeppelin StandardMerkleTree leaves: double keccak
///         of the abi-encoded record fields, sorted-pair hashing), so anyone holding a record and
///         its proof can check on chain that the record was settled.
/// @dev Only the relayer (the settlement service's key) may anchor; a root is anchored at most
///      once, which lets the service treat `DuplicateRoot` as "already anchored" after a crash.
contract Settlement {
    /// @notice What the chain remembers about an anchored batch.
    /// @param count Number of leaves in the batch's tree.
    /// @param settledAt Block timestamp of the anchoring transaction.
    /// @param blockNumber Block number of the anchoring transaction.
    struct Batch {
        uint64 count;
        uint64 settledAt;
        uint64 blockNumber;
    }

    /// @notice The only address allowed to call `settleBatch`.
    address public immutable relayer;

    /// @notice The deployer (kept for future administrative functions; no powers today).
    address public owner;

    /// @notice Anchored batches by Merkle root; `count == 0` means "not anchored".
    mapping(bytes32 root => Batch) public batches;

    /// @notice Number of batches anchored so far; the next batch gets this index.
    uint256 public batchCount;

    /// @notice Emitted once per anchored batch.
    /// @param root The batch's Merkle root.
    /// @param batchIndex Zero-based position of the batch in anchoring order.
    /// @param count Number of leaves in the batch.
    /// @param batchRef sha256 of the batch's published leaf file.
    event BatchSettled(bytes32 indexed root, uint256 indexed batchIndex, uint64 count, bytes32 batchRef);

    /// @notice The caller is not the relayer.
    error NotRelayer();
    /// @notice `root` was already anchored.
    error DuplicateRoot(bytes32 root);
    /// @notice A batch must hold at least one leaf.
    error EmptyBatch();

    /// @param relayer_ The address allowed to anchor batches.
    constructor(address relayer_) {
        relayer = relayer_;
        owner = msg.sender;
    }

    /// @notice Anchor the Merkle root of a batch of `count` records.
    /// @param root The batch's Merkle root.
    /// @param count Number of leaves in the batch; must be non-zero.
    /// @param batchRef sha256 of the batch's published leaf file (see docs/PROTOCOL.md): anyone
    ///        holding the file can rebuild the tree and prove inclusion without the service.
    function settleBatch(bytes32 root, uint64 count, bytes32 batchRef) external {
        if (msg.sender != relayer) revert NotRelayer();
        if (count == 0) revert EmptyBatch();
        if (batches[root].count != 0) revert DuplicateRoot(root);
        batches[root] = Batch({count: count, settledAt: uint64(block.timestamp), blockNumber: uint64(block.number)});
        uint256 batchIndex = batchCount++;
        emit BatchSettled(root, batchIndex, count, batchRef);
    }

    /// @notice Whether `root` has been anchored.
    function isSettled(bytes32 root) external view returns (bool) {
        return batches[root].count != 0;
    }

    /// @notice The leaf of one settled result, computed from its fields as the tree does:
    ///         keccak256(keccak256(abi.encode(requestKey, nodeId, inputHash, outputHash,
    ///         envelopeDigest))). A verifier never takes a leaf hash as given: an inner node of
    ///         the tree would pass a plain path check.
    function leafOf(
        bytes32 requestKey,
        bytes32 nodeId,
        bytes32 inputHash,
        bytes32 outputHash,
        bytes32 envelopeDigest
    ) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(requestKey, nodeId, inputHash, outputHash, envelopeDigest))));
    }

    /// @notice True only when `root` is anchored and `proof` proves the result with these
    ///         fields is in its tree.
    /// @param root An anchored batch root.
    /// @param requestKey keccak256 of the request id's UTF-8 bytes.
    /// @param nodeId The node's ed25519 public key.
    /// @param proof Sibling hashes from the leaf up to the root (sorted-pair hashing).
    function verifyRecord(
        bytes32 root,
        bytes32 requestKey,
        bytes32 nodeId,
        bytes32 inputHash,
        bytes32 outputHash,
        bytes32 envelopeDigest,
        bytes32[] calldata proof
    ) external view returns (bool) {
        bytes32 leaf = leafOf(requestKey, nodeId, inputHash, outputHash, envelopeDigest);
        return batches[root].count != 0 && MerkleProof.verifyCalldata(proof, root, leaf);
    }
}
