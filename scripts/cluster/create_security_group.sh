#!/usr/bin/env bash
# Create the security group cluster.yaml puts every node in, and print its id (paste it over
# sg-0123456789abcdef0 in cluster.yaml). Inbound it admits SSH (tcp 22) from SSH_CIDR, the
# office or VPN range that runs `ray up`, and any traffic between members of the group (Ray,
# object transfers, NCCL); nothing else. Outbound stays AWS's default (all), for pip and the
# shared file system. The tag lets the head's IAM policy launch workers into this group only.
# Uses the AWS CLI's credentials and region: run it in the region of cluster.yaml.
#   AWS_DEFAULT_REGION=us-west-2 bash scripts/cluster/create_security_group.sh VPC_ID SSH_CIDR
#   e.g. ... vpc-0abc1234 203.0.113.0/24
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 VPC_ID SSH_CIDR   (SSH_CIDR: your office or VPN range, e.g. 203.0.113.0/24)" >&2
    exit 2
fi
vpc_id="$1"
ssh_cidr="$2"
if ! [[ "$ssh_cidr" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]{1,2})$ ]] || [ "${BASH_REMATCH[2]}" -gt 32 ]; then
    echo "create_security_group: '$ssh_cidr' is not an IPv4 CIDR such as 203.0.113.0/24" >&2
    exit 2
fi
if [ "${BASH_REMATCH[2]}" -eq 0 ]; then
    echo "create_security_group: '$ssh_cidr' opens SSH to the whole internet; name your own range" >&2
    exit 2
fi
group_id="$(aws ec2 create-security-group \
    --group-name placeforge \
    --description "placeforge Ray cluster: SSH from one range, all traffic within the group" \
    --vpc-id "$vpc_id" \
    --tag-specifications 'ResourceType=security-group,Tags=[{Key=ray-cluster-name,Value=placeforge}]' \
    --query GroupId --output text)"
aws ec2 authorize-security-group-ingress --group-id "$group_id" --ip-permissions "[
    {\"IpProtocol\": \"tcp\", \"FromPort\": 22, \"ToPort\": 22,
     \"IpRanges\": [{\"CidrIp\": \"$ssh_cidr\", \"Description\": \"SSH for ray up / attach / dashboard\"}]},
    {\"IpProtocol\": \"-1\",
     \"UserIdGroupPairs\": [{\"GroupId\": \"$group_id\", \"Description\": \"between cluster nodes\"}]}
]" > /dev/null
echo "$group_id"
