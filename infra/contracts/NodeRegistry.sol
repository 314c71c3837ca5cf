// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

/// @title NodeRegistry
/// @notice The admission authority of an inference network: which node ids may serve and sign
///         results, and which TEE measurements are trusted. Kafka registrations are only the
///         fast discovery path; verifiers (clients, settlement, offline verify) count a node only
///         when this contract admits it, or when its verified TEE evidence shows a measurement
///         approved here. Revoking a node or a measurement here takes effect for every verifier,
///         and unlike a message on a compacted topic it cannot be erased by anyone but governance.
/// @dev A node id is the node's ed25519 public key. Each admitted node names its chain account:
///      its results carry an EIP-191 signature of the envelope digest by that account, which
///      `verifyResult` checks with `ecrecover` for a consumer contract acting on one result.
contract NodeRegistry {
    /// @notice What the registry knows of one node.
    /// @param chainAddress The node's chain account (signs results beside its ed25519 key).
    /// @param admittedAt Block timestamp of the latest admission (0: never admitted).
    /// @param revokedAt Block timestamp of the latest revocation after it (0: not revoked).
    struct Node {
        address chainAddress;
        uint64 admittedAt;
        uint64 revokedAt;
    }

    /// @notice The key allowed to admit and revoke (a multisig or DAO in production).
    address public governance;

    /// @notice Nodes by node id.
    mapping(bytes32 nodeId => Node) public nodes;

    /// @notice Measurement status by `measurementId(kind, measurement)`: 1 approved, 2 revoked.
    mapping(bytes32 measurementKey => uint8) public measurementStatus;

    event GovernanceTransferred(address indexed previous, address indexed next);
    event NodeAdmitted(bytes32 indexed nodeId, address indexed chainAddress);
    event NodeRevoked(bytes32 indexed nodeId);
    event MeasurementApproved(bytes32 indexed measurementKey, string kind, bytes measurement);
    event MeasurementRevoked(bytes32 indexed measurementKey, string kind, bytes measurement);

    /// @notice The caller is not governance.
    error NotGovernance();
    /// @notice The zero address cannot be a node's chain account or governance.
    error ZeroAddress();

    constructor(address governance_) {
        if (governance_ == address(0)) revert ZeroAddress();
        governance = governance_;
        emit GovernanceTransferred(address(0), governance_);
    }

    modifier onlyGovernance() {
        if (msg.sender != governance) revert NotGovernance();
        _;
    }

    /// @notice Hand governance to another key.
    function transferGovernance(address next) external onlyGovernance {
        if (next == address(0)) revert ZeroAddress();
        emit GovernanceTransferred(governance, next);
        governance = next;
    }

    /// @notice Admit node `nodeId` with chain account `chainAddress` (again, after a revocation).
    function admitNode(bytes32 nodeId, address chainAddress) external onlyGovernance {
        if (chainAddress == address(0)) revert ZeroAddress();
        nodes[nodeId] = Node({chainAddress: chainAddress, admittedAt: uint64(block.timestamp), revokedAt: 0});
        emit NodeAdmitted(nodeId, chainAddress);
    }

    /// @notice Revoke node `nodeId`: verifiers stop counting it at once.
    function revokeNode(bytes32 nodeId) external onlyGovernance {
        nodes[nodeId].revokedAt = uint64(block.timestamp);
        emit NodeRevoked(nodeId);
    }

    /// @notice The key of a TEE measurement: keccak256(abi.encode(kind, measurement)).
    /// @param kind "tdx", "sev-snp", "nitro" or "dev".
    function measurementId(string calldata kind, bytes calldata measurement) public pure returns (bytes32) {
        return keccak256(abi.encode(kind, measurement));
    }

    /// @notice Trust measurement `measurement` of kind `kind`: nodes whose verified evidence
    ///         shows it count as admitted.
    function approveMeasurement(string calldata kind, bytes calldata measurement) external onlyGovernance {
        bytes32 key = measurementId(kind, measurement);
        measurementStatus[key] = 1;
        emit MeasurementApproved(key, kind, measurement);
    }

    /// @notice Revoke a measurement: every node running it stops counting, admitted or not.
    function revokeMeasurement(string calldata kind, bytes calldata measurement) external onlyGovernance {
        bytes32 key = measurementId(kind, measurement);
        measurementStatus[key] = 2;
        emit MeasurementRevoked(key, kind, measurement);
    }

    /// @notice Whether `nodeId` is admitted now.
    function isAdmitted(bytes32 nodeId) public view returns (bool) {
        Node storage node = nodes[nodeId];
        return node.admittedAt != 0 && node.revokedAt == 0;
    }

    /// @notice Whether node `nodeId` signed envelope digest `digest` with its admitted chain
    ///         account: the on-chain check of one result (EIP-191 over the 32-byte digest).
    function verifyResult(bytes32 nodeId, bytes32 digest, bytes calldata signature) external view returns (bool) {
        if (!isAdmitted(nodeId)) return false;
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecover(MessageHashUtils.toEthSignedMessageHash(digest), signature);
        return err == ECDSA.RecoverError.NoError && signer == nodes[nodeId].chainAddress;
    }
}
